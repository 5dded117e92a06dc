package doctor_test

import (
	"context"
	"fmt"
	"time"

	"github.com/duplex-ha/duplex/internal/doctor"
)

// Run examines the host; OK says whether duplex can work here at all, each check
// says what a missing piece costs.
func ExampleRun() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := doctor.Run(ctx, doctor.Options{})
	for _, c := range r.Checks {
		fmt.Printf("%-16s %-7s %s\n", c.Name, c.Status, c.Detail)
	}
	if !r.OK() {
		fmt.Println("duplex cannot run on this host")
	}
}
