package netfail

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// inNetns runs fn on an OS thread switched into ns and switches the thread back.
//
// fn runs on a fresh goroutine locked to its thread. The thread is unlocked only after
// it is back in its original namespace; on any failure the goroutine exits still
// locked, and the Go runtime then terminates the thread instead of reusing it, so no
// goroutine ever runs in the wrong namespace. Sockets fn opens stay in ns.
func inNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current netns: %w", err)
			return // thread discarded
		}
		defer orig.Close()
		if ns.Equal(orig) { // already there: no switch needed, nor privileges for it
			err := fn()
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return // thread discarded
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("return to original netns: %w", err)
			return // thread discarded
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
