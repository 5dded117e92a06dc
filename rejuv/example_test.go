package rejuv_test

import (
	"context"
	"fmt"
	"strings"

	"github.com/duplex-ha/duplex/rejuv"
)

// The test harness's ladder: restart the units, then "restart the host" by letting the
// daemon exit. Exec and Exit here only print what a host would do.
func ExampleRun() {
	cfg := rejuv.Config{
		Actions:  []string{"restart-services", "reboot"},
		Services: []string{"app.service"},
		Reboot:   "exit",
	}
	ladder, err := cfg.Ladder(rejuv.Options{
		Exec: func(_ context.Context, name string, args ...string) error {
			fmt.Println("exec:", name, strings.Join(args, " "))
			return nil
		},
		Exit: func() error {
			fmt.Println("exit")
			return nil
		},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	_, err = rejuv.Run(context.Background(), ladder, func(r rejuv.StepResult) {
		fmt.Printf("%s: %s\n", r.Action, r.Detail)
	})
	fmt.Println("error:", err)
	// Output:
	// exec: systemctl restart app.service
	// restart-services: restarted app.service
	// exit
	// reboot: daemon exiting: its supervisor restarts the host
	// error: <nil>
}

func ExampleConfig_Ladder() {
	_, err := rejuv.Config{Scratch: []string{"/var/tmp/app", "/var/lib"}, Reboot: "halt"}.Ladder(rejuv.Options{})
	fmt.Println(err)
	// Output:
	// rejuv: scratch[1] "/var/lib": a system directory, never cleared
	// rejuv: reboot "halt": unknown reboot method (want one of reboot, systemd, kexec, exit, none)
}
