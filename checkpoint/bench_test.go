package checkpoint_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// BenchmarkDumpRestore measures one stop-and-copy cycle through the engine for
// workloads of 64 MiB and 512 MiB resident memory, images on tmpfs, and reports
// CRIU's own figures: frozen time and dump wall time, restore time and restore wall
// time, in milliseconds.
func BenchmarkDumpRestore(b *testing.B) {
	for _, size := range []string{"64M", "512M"} {
		b.Run(size+"iB", func(b *testing.B) {
			eng := testutil.RequiresCRIU(b)
			var frozen, dumpWall, restore, restoreWall, mib float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				rec := launch(b, "hog", "hog", size)
				testutil.Eventually(b, time.Minute, "the hog to fill its memory", func() bool {
					out, _ := os.ReadFile(rec.Stdout)
					return strings.Contains(string(out), "READY")
				})
				dir, err := os.MkdirTemp("/dev/shm", "duplex-bench-")
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				st, err := eng.Dump(context.Background(), checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, ManageCgroups: true})
				if err != nil {
					os.RemoveAll(dir)
					b.Fatal(err)
				}
				res, err := eng.Restore(context.Background(), checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true})
				b.StopTimer()
				os.RemoveAll(dir)
				if err != nil {
					b.Fatal(err)
				}
				killChild(res.Pid)
				frozen += ms(st.FrozenTime)
				dumpWall += ms(st.Wall)
				restore += ms(res.RestoreTime)
				restoreWall += ms(res.Wall)
				mib += float64(st.PagesWritten*4096) / (1 << 20)
			}
			n := float64(b.N)
			b.ReportMetric(frozen/n, "frozen-ms")
			b.ReportMetric(dumpWall/n, "dump-ms")
			b.ReportMetric(restore/n, "restore-ms")
			b.ReportMetric(restoreWall/n, "restore-wall-ms")
			b.ReportMetric(mib/n, "MiB")
		})
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
