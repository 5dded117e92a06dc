package checkpoint_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
)

// copyMissing copies the files of src that dst lacks (the images a page-server or
// lazy dump leaves on the source) and returns their names.
func copyMissing(t *testing.T, src, dst string) []string {
	t.Helper()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if e.IsDir() || strings.HasSuffix(e.Name(), ".log") {
			continue
		}
		if _, err := os.Stat(filepath.Join(dst, e.Name())); err == nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
		names = append(names, e.Name())
	}
	return names
}

func hasPages(dir string) bool {
	m, _ := filepath.Glob(filepath.Join(dir, "pages-*.img"))
	return len(m) > 0
}

func TestPageServerDump(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	rec := launch(t, "paged", "counter")
	grows(t, rec.Stdout, "counter output")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, dst := t.TempDir(), t.TempDir()

	ps, err := eng.StartPageServer(ctx, checkpoint.PageServerOptions{ImagesDir: dst, Address: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Stop()
	if ps.Port <= 0 {
		t.Fatalf("page server reported port %d", ps.Port)
	}
	st, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: src, ManageCgroups: true,
		PageServer: &checkpoint.Address{Host: "127.0.0.1", Port: ps.Port}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ps.Wait(ctx); err != nil {
		t.Fatalf("page server did not finish after the dump: %v", err)
	}
	if hasPages(src) || !hasPages(dst) {
		t.Fatalf("pages went to the wrong side: source has pages %v, destination %v", hasPages(src), hasPages(dst))
	}
	if st.PagesWritten == 0 {
		t.Errorf("dump reports no pages written: %+v", st)
	}
	copyMissing(t, src, dst)
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dst, ManageCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	grows(t, rec.Stdout, "the restored counter to count")
}

func TestLazyRestoreFromImages(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
	rec := launch(t, "lazy", "hog", "32M")
	testutil.Eventually(t, 30*time.Second, "the hog to fill its memory", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		return strings.Contains(string(b), "READY")
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	if _, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, ManageCgroups: true}); err != nil {
		t.Fatal(err)
	}
	lp, err := eng.StartLazyPages(ctx, checkpoint.LazyPagesOptions{ImagesDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Stop()
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true, LazyPages: true})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	// The daemon delivers the remaining pages in the background and exits.
	if err := lp.Wait(ctx); err != nil {
		t.Fatalf("lazy-pages daemon: %v", err)
	}
	if s := procState(res.Pid); s == 0 || s == 'Z' {
		t.Fatalf("restored hog is not running (state %q)", s)
	}
	// 32 MiB must now be resident again in the restored copy.
	testutil.Eventually(t, 10*time.Second, "the restored hog's memory to be resident", func() bool {
		return rssKiB(res.Pid) >= 32*1024
	})
}

func rssKiB(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var kb int
		if _, err := fmt.Sscanf(sc.Text(), "VmRSS: %d kB", &kb); err == nil {
			return kb
		}
	}
	return 0
}

// echoPort waits for an echo workload's port.
func echoPort(t *testing.T, stdout string) int {
	var port int
	testutil.Eventually(t, 5*time.Second, "the echo server's port", func() bool {
		b, _ := os.ReadFile(stdout)
		_, err := fmt.Sscanf(string(b), "PORT %d", &port)
		return err == nil
	})
	return port
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read back %q: %v", msg, err)
	}
	if string(buf) != msg {
		t.Fatalf("echo %q, want %q", buf, msg)
	}
}

func TestEstablishedTCPConnection(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureNFTablesLock)
	rec := launch(t, "echo", "echo")
	port := echoPort(t, rec.Stdout)
	c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "before")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// Without --tcp-established a tree with a connected socket cannot be dumped,
	// and CRIU leaves it running.
	_, err = eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: t.TempDir(), ManageCgroups: true})
	if err == nil {
		t.Fatal("dump of an established connection succeeded without TCPEstablished")
	}
	if !strings.Contains(err.Error(), "established") {
		t.Errorf("error does not say why: %v", err)
	}
	roundTrip(t, c, "still-there")

	dir := t.TempDir()
	st, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, ManageCgroups: true,
		TCPEstablished: true, NetworkLock: checkpoint.LockNFTables})
	if err != nil {
		t.Fatal(err)
	}
	// The lock's set holds both directions of the connection, and what the
	// client sends now is dropped: without the lock the kernel would answer
	// for the dumped socket with a reset.
	if st.LockTable == "" {
		t.Fatal("the dump names no network-lock table")
	}
	dumpLog, _ := os.ReadFile(filepath.Join(dir, checkpoint.DumpLog))
	if ok, _ := eng.HasFeature(ctx, checkpoint.FeatureNFTLockNftnl); ok && !strings.Contains(string(dumpLog), "with libnftnl") {
		t.Errorf("CRIU has %s, but its log shows no connection added with libnftnl", checkpoint.FeatureNFTLockNftnl)
	}
	// The tree has its own PID namespace and no zombies: its /proc is not made.
	if ok, _ := eng.HasFeature(ctx, checkpoint.FeatureProcFDZombiesOnly); ok && !strings.Contains(string(dumpLog), "No zombies: the tree's /proc is not needed") {
		t.Errorf("CRIU has %s, but the dump of a tree without zombies made its /proc", checkpoint.FeatureProcFDZombiesOnly)
	}
	out, err := exec.Command("nft", "list", "set", "inet", st.LockTable, "conns4").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list set: %v\n%s", err, out)
	}
	local := c.LocalAddr().(*net.TCPAddr).Port
	for _, e := range []string{fmt.Sprintf("127.0.0.1 . %d . 127.0.0.1 . %d", port, local),
		fmt.Sprintf("127.0.0.1 . %d . 127.0.0.1 . %d", local, port)} {
		if !strings.Contains(string(out), e) {
			t.Errorf("lock set lacks %q:\n%s", e, out)
		}
	}
	const early = "sent-while-dumped"
	if _, err := io.WriteString(c, early); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the first retransmission comes after 200 ms
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true,
		TCPEstablished: true, NetworkLock: checkpoint.LockNFTables})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	// The same client connection works against the restored server: no reset,
	// and what was sent while it was dumped arrives by retransmission.
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, len(early))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != early {
		t.Fatalf("echo of what was sent while dumped: %q, %v", buf, err)
	}
	roundTrip(t, c, "after-restore")
	if st.LockTable != "" && strings.Contains(lockTables(t), st.LockTable) {
		t.Errorf("CRIU's network-lock table %s left behind", st.LockTable)
	}
}

// lockTables lists CRIU's network-lock tables in this network namespace.
func lockTables(t *testing.T) string {
	out, err := exec.Command("nft", "list", "tables").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list tables: %v\n%s", err, out)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "CRIU-") {
			names = append(names, strings.TrimSpace(l))
		}
	}
	return strings.Join(names, ", ")
}

// After a dump that froze a tree with an established connection, rolling back
// gives the client its connection back: no reset, no lock left.
func TestRollbackKeepsEstablishedConnection(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureNFTablesLock)
	rec := launch(t, "echo", "echo")
	c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", echoPort(t, rec.Stdout)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "before")
	st, err := eng.Dump(context.Background(), checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: t.TempDir(), ManageCgroups: true,
		TCPEstablished: true, NetworkLock: checkpoint.LockNFTables, LeaveStopped: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.LockTable == "" || !strings.Contains(lockTables(t), st.LockTable) {
		t.Fatalf("lock table %q not found among %q", st.LockTable, lockTables(t))
	}
	if err := checkpoint.Rollback(rec.Pid, st.LockTable); err != nil {
		t.Fatal(err)
	}
	if left := lockTables(t); strings.Contains(left, st.LockTable) {
		t.Errorf("network lock %s left after rollback", st.LockTable)
	}
	roundTrip(t, c, "after-rollback")
	roundTrip(t, c, strings.Repeat("x", 100000))
}

// Discard ends the frozen source after its copy took over and removes its lock.
func TestDiscardAfterRestore(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureNFTablesLock)
	rec := launch(t, "echo", "echo")
	c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", echoPort(t, rec.Stdout)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "before")
	dir := t.TempDir()
	st, err := eng.Dump(context.Background(), checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, ManageCgroups: true,
		TCPEstablished: true, NetworkLock: checkpoint.LockNFTables, LeaveStopped: true})
	if err != nil {
		t.Fatal(err)
	}
	// The source must go before its copy can own the same connection on this host.
	if err := checkpoint.Discard(rec.Pid, st.LockTable); err != nil {
		t.Fatal(err)
	}
	res, err := eng.Restore(context.Background(), checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true,
		TCPEstablished: true, NetworkLock: checkpoint.LockNFTables})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	roundTrip(t, c, "after-restore")
	if left := lockTables(t); strings.Contains(left, st.LockTable) {
		t.Errorf("network lock %s left", st.LockTable)
	}
}

// SocketPair returns two connected stream sockets.
func socketPair(t *testing.T) (*os.File, *os.File) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
}

// A dump whose page traffic goes through a connection the caller provides (the
// migration engine's own tunnel) reaches a page server serving the other end.
func TestPageServerOverGivenConnection(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	rec := launch(t, "tunnelled", "counter")
	grows(t, rec.Stdout, "counter output")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, dst := t.TempDir(), t.TempDir()
	a, b := socketPair(t)
	defer a.Close()
	defer b.Close()
	ps, err := eng.StartPageServer(ctx, checkpoint.PageServerOptions{ImagesDir: dst, Conn: a})
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Stop()
	st, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: src, ManageCgroups: true, LeaveStopped: true, PageServerConn: b})
	if err != nil {
		t.Fatal(err)
	}
	if err := ps.Wait(ctx); err != nil {
		t.Fatalf("page server: %v", err)
	}
	if hasPages(src) || !hasPages(dst) || st.PagesWritten == 0 {
		t.Fatalf("pages: source %v, destination %v, written %d", hasPages(src), hasPages(dst), st.PagesWritten)
	}
	if st.FrozenTime > 150*time.Millisecond {
		t.Logf("note: frozen %s", st.FrozenTime)
	}
	if ok, _ := eng.HasFeature(ctx, checkpoint.FeatureSmapsCopy); ok && !eng.NoSmapsCopy {
		// The counter is one process; its smaps were copied before the freeze, and
		// the restore below shows the dump that used the copy is sound.
		log, _ := os.ReadFile(filepath.Join(src, checkpoint.DumpLog))
		used := strings.Contains(string(log), "the copy made before the freeze")
		if st.SmapsCopied != 1 {
			t.Errorf("smaps copied for %d processes, want 1", st.SmapsCopied)
		}
		t.Logf("smaps copy used: %v", used)
	}
	copyMissing(t, src, dst)
	if err := checkpoint.Discard(rec.Pid, st.LockTable); err != nil {
		t.Fatal(err)
	}
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dst, ManageCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	grows(t, rec.Stdout, "the restored counter to count")
}

// Post-copy over a connection the caller carries: the restored copy runs before its
// memory arrived, then the lazy-pages daemon pulls every page from the frozen source.
func TestLazyDumpOverConnection(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
	rec := launch(t, "lazyconn", "hog", "32M")
	testutil.Eventually(t, 30*time.Second, "the hog to fill its memory", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		return strings.Contains(string(b), "READY")
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, dst := t.TempDir(), t.TempDir()
	a, b := socketPair(t)
	defer a.Close()
	defer b.Close()
	dumped := lazyDumpCopied(ctx, t, eng, rec.Pid, src, dst, b)
	lp, err := eng.StartLazyPages(ctx, checkpoint.LazyPagesOptions{ImagesDir: dst, Conn: a})
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Stop()
	start := time.Now()
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dst, ManageCgroups: true, LazyPages: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lazy restore took %s", time.Since(start))
	defer killChild(res.Pid)
	if err := lp.Wait(ctx); err != nil {
		t.Fatalf("lazy-pages daemon: %v", err)
	}
	if err := <-dumped; err != nil {
		t.Fatalf("lazy dump: %v", err)
	}
	testutil.Eventually(t, 10*time.Second, "the restored hog's memory", func() bool { return rssKiB(res.Pid) >= 32*1024 })
	if s := procState(rec.Pid); s != 0 && s != 'Z' {
		t.Errorf("source still exists after its pages were served (state %c)", s)
	}
}

// A lazy-pages daemon that reads the images only when the restore connects can be
// started before they exist (duplex's CRIU patch): migrate starts it at Prepare,
// outside the downtime. The restored tree's memory must be whole: the workload
// checks every page each second and says CORRUPT on the first wrong one. Once with
// 4 KiB pages and once with transparent huge pages everywhere (THP "always", the
// default of many distributions), which a patch that dumped one page of a thread's
// stack area eagerly once broke: the restore's write of that page filled in a huge
// page, and the lazy pages under it never arrived. The THP case sets the system's
// mode to "always" for its run and puts the old one back.
func TestLazyPagesBeforeImages(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureLazyPagesBeforeImages)
	for _, tc := range []struct{ name, mode string }{{"4k", "dirty"}, {"thp", "dirty-thp"}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.mode == "dirty-thp" {
				thpAlways(t)
			}
			lazyRestoreChecked(t, eng, tc.mode, "32M")
		})
	}
}

// thpAlways switches transparent huge pages to "always" until the test ends.
func thpAlways(t *testing.T) {
	const knob = "/sys/kernel/mm/transparent_hugepage/enabled"
	b, err := os.ReadFile(knob)
	if err != nil {
		t.Skipf("no transparent huge pages here: %v", err)
	}
	old := string(b)
	old = old[strings.Index(old, "[")+1 : strings.Index(old, "]")]
	if err := os.WriteFile(knob, []byte("always"), 0); err != nil {
		t.Skipf("cannot set transparent huge pages to always: %v", err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(knob, []byte(old), 0); err != nil {
			t.Errorf("put transparent huge pages back to %s: %v", old, err)
		}
	})
}

// A run of present pages of 2 GiB or more used to end the lazy-pages daemon
// before the restore finished: once duplex's CRIU wrote one pagemap entry per run
// (lazy-dump-one-buf.patch), the daemon's transfer buffer, sized by the longest
// entry in an int, overflowed. The bench's 2 GiB service caught it (and the
// migration rolled back); this checks every page of a 2.1 GiB workload after a lazy
// restore. It needs about 4.5 GiB of free memory (both copies) and takes 15-30 s.
func TestLazyRestoreOver2GiB(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureLazyPagesBeforeImages)
	if avail := memAvailableMiB(t); avail < 6<<10 {
		t.Skipf("needs 6 GiB of available memory, this host has %d MiB", avail)
	}
	lazyRestoreChecked(t, eng, "dirty", "2100M")
}

// memAvailableMiB is the host's MemAvailable.
func memAvailableMiB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		var kb int
		if _, err := fmt.Sscanf(l, "MemAvailable: %d kB", &kb); err == nil {
			return kb >> 10
		}
	}
	t.Fatal("no MemAvailable in /proc/meminfo")
	return 0
}

func lazyRestoreChecked(t *testing.T, eng *checkpoint.Engine, mode, size string) {
	lazyRestoreRun(t, eng, mode, size, "4M")
}

// lazyRestoreRun runs testprog args (a mode that prints READY, then "OK n" after
// each check of its memory or "CORRUPT ..."), moves it by lazy dump, lazy-pages
// daemon and lazy restore, waits for two more checks by the restored copy, and
// returns the dump's log.
func lazyRestoreRun(t *testing.T, eng *checkpoint.Engine, args ...string) string {
	mode := args[0]
	rec := launch(t, "lazyearly", args...)
	testutil.Eventually(t, 2*time.Minute, "the workload to fill its memory", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		return strings.Contains(string(b), "READY")
	})
	if mode == "dirty-thp" {
		if kib := smapsSum(t, rec.Pid, "AnonHugePages:"); kib < 2048 {
			t.Fatalf("the workload has %d KiB in huge pages: the test would not test them", kib)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	src, dst := t.TempDir(), t.TempDir()
	a, b := socketPair(t)
	defer a.Close()
	defer b.Close()
	lp, err := eng.StartLazyPages(ctx, checkpoint.LazyPagesOptions{ImagesDir: dst, Conn: a})
	if err != nil {
		t.Fatalf("lazy-pages daemon on an empty directory: %v", err)
	}
	defer lp.Stop()

	dumped := lazyDumpCopied(ctx, t, eng, rec.Pid, src, dst, b)
	stdout := func() string { b, _ := os.ReadFile(rec.Stdout); return string(b) }
	before := strings.Count(stdout(), "OK ")
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dst, ManageCgroups: true, LazyPages: true})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	if err := lp.Wait(ctx); err != nil {
		t.Fatalf("lazy-pages daemon: %v", err)
	}
	if err := <-dumped; err != nil {
		t.Fatalf("lazy dump: %v", err)
	}
	testutil.Eventually(t, 2*time.Minute, "two checks of every page by the restored workload", func() bool {
		out := stdout()
		if strings.Contains(out, "CORRUPT") {
			t.Fatalf("the restored workload found a corrupt page: %s", out[strings.Index(out, "CORRUPT"):])
		}
		return strings.Count(out, "OK ") >= before+2
	})
	dumpLog, err := os.ReadFile(filepath.Join(src, checkpoint.DumpLog))
	if err != nil {
		t.Fatal(err)
	}
	return string(dumpLog)
}

// lazyMove is a workload moved by lazy dump, lazy-pages daemon and lazy restore,
// its memory still on its way.
type lazyMove struct {
	src    string // the dump's images directory (its log)
	lp     *checkpoint.LazyPages
	res    *checkpoint.RestoreResult
	dumped <-chan error
}

// startLazyMove waits for rec to print READY, then moves it lazily over a socket
// pair; the test's end stops the daemon and kills the restored copy.
func startLazyMove(ctx context.Context, t *testing.T, eng *checkpoint.Engine, rec workload.Record, hold bool) *lazyMove {
	t.Helper()
	testutil.Eventually(t, time.Minute, "the workload to fill its memory", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		return strings.Contains(string(b), "READY")
	})
	src, dst := t.TempDir(), t.TempDir()
	a, b := socketPair(t)
	t.Cleanup(func() { a.Close(); b.Close() })
	lp, err := eng.StartLazyPages(ctx, checkpoint.LazyPagesOptions{ImagesDir: dst, Conn: a, HoldBackground: hold})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(lp.Stop)
	dumped := lazyDumpCopied(ctx, t, eng, rec.Pid, src, dst, b)
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dst, ManageCgroups: true, LazyPages: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killChild(res.Pid) })
	return &lazyMove{src: src, lp: lp, res: res, dumped: dumped}
}

// A lazy-pages daemon started with HoldBackground serves the restored copy's
// faults but fetches nothing else until StartBackground: an idle 64 MiB workload
// keeps the transfer unfinished while held (unheld it ends in well under a
// second here), runs all along, and its transfer ends once released.
func TestLazyPagesHoldBackground(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureLazyPagesBeforeImages, checkpoint.FeatureLazyBackgroundGate)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	mv := startLazyMove(ctx, t, eng, launch(t, "lazyhold", "hog", "64M"), true)
	lp, res := mv.lp, mv.res
	held, cancelHeld := context.WithTimeout(ctx, 1500*time.Millisecond)
	err := lp.Wait(held)
	cancelHeld()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the held transfer ended (%v) before StartBackground", err)
	}
	if procState(res.Pid) == 0 {
		t.Fatal("the restored copy does not run while its transfer is held")
	}
	lp.StartBackground()
	if err := lp.Wait(ctx); err != nil {
		t.Fatalf("lazy-pages daemon after StartBackground: %v", err)
	}
	if err := <-mv.dumped; err != nil {
		t.Fatalf("lazy dump: %v", err)
	}
	if procState(res.Pid) == 0 {
		t.Fatal("the restored copy died once its memory arrived")
	}
	if b, _ := os.ReadFile(lp.LogPath); !strings.Contains(string(b), "Background transfer may start") {
		t.Errorf("the daemon's log does not say the gate opened:\n%s", grepLines(string(b), "ackground"))
	}
}

// A thread whose stack pointer is page aligned made CRIU's is_stack() take every
// page for a stack page, and a lazy dump then made none of them lazy: the whole
// memory went into the images inside the freeze (lazy-no-stack-pages.patch). The
// workload is testdata/alignedsp.c, built with the C compiler make deps installs.
func TestLazyDumpAlignedStackPointer(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureLazyPagesBeforeImages)
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler to build testdata/alignedsp.c (make deps installs one)")
	}
	prog := filepath.Join(t.TempDir(), "alignedsp")
	if out, err := exec.Command(cc, "-O2", "-pthread", "-o", prog, "testdata/alignedsp.c").CombinedOutput(); err != nil {
		t.Fatalf("build alignedsp: %v: %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	mv := startLazyMove(ctx, t, eng, launchProg(t, "alignedsp", prog), false)
	if err := mv.lp.Wait(ctx); err != nil {
		t.Fatalf("lazy-pages daemon: %v", err)
	}
	if err := <-mv.dumped; err != nil {
		t.Fatalf("lazy dump: %v", err)
	}
	log, err := os.ReadFile(filepath.Join(mv.src, checkpoint.DumpLog))
	if err != nil {
		t.Fatal(err)
	}
	// The 64 MiB area: all of its 16384 pages present, all lazy.
	var total, lazy int
	for _, l := range strings.Split(string(log), "\n") {
		var n, nl int
		if i := strings.Index(l, "Pagemap generated: "); i >= 0 {
			if _, err := fmt.Sscanf(l[i:], "Pagemap generated: %d pages (%d lazy)", &n, &nl); err == nil && n >= 16384 {
				total, lazy = n, nl
			}
		}
	}
	if total == 0 || lazy != total {
		t.Errorf("the 64 MiB area: %d pages, %d of them lazy; want all lazy:\n%s", total, lazy, grepLines(string(log), "Pagemap generated"))
	}
	if procState(mv.res.Pid) == 0 {
		t.Error("the restored copy does not run")
	}
}

// A lazy dump takes a long anonymous VMA that is nearly all in memory whole,
// without scanning it for present pages (lazy-dense-whole.patch): its holes then
// travel as zeroes, and must read as zeroes in the restored copy. A sparse VMA is
// scanned, so only its present pages travel. Guard regions are looked for only in
// the VMAs smaps marks "gu" (guard-scan-flagged.patch), and the one the workload
// installed must still fault after the restore. testprog holes checks all three
// on every page, before and after.
func TestLazyRestoreDenseAndSparse(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop, checkpoint.FeatureLazyPagesBeforeImages)
	for _, tc := range []struct {
		name, holes string
		whole       bool
	}{{"dense", "3", true}, {"sparse", "40", false}} {
		t.Run(tc.name, func(t *testing.T) {
			log := lazyRestoreRun(t, eng, "holes", "96M", tc.holes)
			dense, _ := eng.HasFeature(context.Background(), checkpoint.FeatureLazyDenseWhole)
			if got := strings.Contains(log, "taken whole without a scan"); got != (tc.whole && dense) {
				t.Errorf("96 MiB with %s%% holes taken whole: %v, want %v", tc.holes, got, tc.whole && dense)
			}
			if flagged, _ := eng.HasFeature(context.Background(), checkpoint.FeatureGuardScanFlagged); flagged && !strings.Contains(log, "Guard regions: 1 found in the 1 VMAs that may have them") {
				t.Errorf("the dump did not find the one guard region in the one flagged VMA:\n%s", grepLines(log, "Guard regions"))
			}
		})
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// smapsSum adds up one field (e.g. "AnonHugePages:") of every mapping of pid, in KiB.
func smapsSum(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	sum := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field {
			n, _ := strconv.Atoi(f[1])
			sum += n
		}
	}
	return sum
}

// lazyDumpCopied starts a lazy dump of pid into src that serves its pages on conn,
// waits until it is ready to serve them, and copies its images to dst. The dump's
// outcome arrives on the channel once the last page was served.
func lazyDumpCopied(ctx context.Context, t *testing.T, eng *checkpoint.Engine, pid int, src, dst string, conn *os.File) <-chan error {
	t.Helper()
	ready := make(chan struct{})
	dumped := make(chan error, 1)
	go func() {
		_, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: pid, ImagesDir: src, ManageCgroups: true,
			PageServerConn: conn, LazyConn: true, Ready: func() { close(ready) }})
		dumped <- err
	}()
	select {
	case <-ready:
	case err := <-dumped:
		t.Fatalf("lazy dump ended before serving: %v", err)
	}
	if names := copyMissing(t, src, dst); len(names) == 0 {
		t.Fatal("no images to copy")
	}
	return dumped
}
