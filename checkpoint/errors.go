package checkpoint

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"
)

// ErrNotSupported is returned when this kernel or CRIU lacks a feature an
// operation needs (for example dirty-memory tracking for a pre-dump).
var ErrNotSupported = errors.New("not supported on this host")

// ErrMissingFile matches (errors.Is) a restore that failed because a file the
// checkpointed tree had open does not exist on this host. Use errors.As with
// *MissingFileError to learn which.
var ErrMissingFile = errors.New("file missing on this host")

// MissingFileError names a file a restore needed and did not find.
type MissingFileError struct {
	Path string
}

func (e *MissingFileError) Error() string { return "missing file " + e.Path }

// Is reports ErrMissingFile.
func (e *MissingFileError) Is(target error) bool { return target == ErrMissingFile }

// CRIUError is a failed CRIU operation with the lines of CRIU's log that explain it.
type CRIUError struct {
	Op      string   // "dump", "pre-dump", "restore", "page-server", ...
	Err     error    // what go-criu or the CRIU process returned
	LogPath string   // CRIU's full log
	Lines   []string // the log lines that explain the failure, oldest first
	Missing *MissingFileError
}

func (e *CRIUError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "criu %s failed", e.Op)
	if len(e.Lines) == 0 || !strings.Contains(e.Err.Error(), "operation failed") {
		// go-criu's own message quotes CRIU's first error line, which is usually
		// noise; the explaining lines below say more.
		fmt.Fprintf(&b, ": %s", strings.ReplaceAll(e.Err.Error(), "\n", " "))
	}
	if e.Missing != nil {
		fmt.Fprintf(&b, ": %s", e.Missing.Error())
	}
	for _, l := range e.Lines {
		b.WriteString("\n    ")
		b.WriteString(l)
	}
	if e.LogPath != "" {
		fmt.Fprintf(&b, "\n    (full log: %s)", e.LogPath)
	}
	return b.String()
}

func (e *CRIUError) Unwrap() []error {
	if e.Missing != nil {
		return []error{e.Err, e.Missing}
	}
	return []error{e.Err}
}

// noise holds CRIU log errors that are harmless and never the cause of a failure.
var noise = []string{
	// Logged first by every CRIU run that lacks CAP_SYS_RESOURCE.
	"Can't setup RLIMIT_NOFILE",
	// Hosts without iptables: CRIU probes for it even when told to lock with nftables.
	"iptables-save",
	// Summary lines that only repeat that an error happened.
	"Dumping FAILED",
	"Restoring FAILED",
}

// maxExplainLines bounds how much of CRIU's log an error quotes.
const maxExplainLines = 8

var (
	logPrefix = regexp.MustCompile(`^\(\s*[0-9.]+\)\s*`)
	// CRIU strips the leading slash of paths relative to the root it restores in.
	missingFileRe = []*regexp.Regexp{
		regexp.MustCompile(`Can't open file (\S+) on restore: No such file or directory`),
		regexp.MustCompile(`Can't open file (\S+).*No such file or directory`),
		regexp.MustCompile(`Can't stat (?:file )?(\S+?):? .*No such file or directory`),
		regexp.MustCompile(`(?:open|stat)\(?(\S+?)\)? .*No such file or directory`),
	}
)

// explainLog reads a CRIU log and returns the lines that explain a failure: its
// error lines minus known noise, oldest first, at most maxExplainLines (the last
// ones). When the log has no error line, its last lines are returned instead.
func explainLog(path string) ([]string, *MissingFileError) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil
	}
	defer f.Close()

	var errs, tail []string
	var missing *MissingFileError
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := logPrefix.ReplaceAllString(strings.TrimSpace(sc.Text()), "")
		if line == "" {
			continue
		}
		tail = append(tail, line)
		if len(tail) > 4 {
			tail = tail[1:]
		}
		if !strings.Contains(line, "Error") {
			continue
		}
		if isNoise(line) {
			continue
		}
		errs = append(errs, line)
		if missing == nil {
			missing = matchMissing(line)
		}
	}
	if len(errs) == 0 {
		return tail, nil
	}
	if len(errs) > maxExplainLines {
		errs = errs[len(errs)-maxExplainLines:]
	}
	return errs, missing
}

func isNoise(line string) bool {
	for _, n := range noise {
		if strings.Contains(line, n) {
			return true
		}
	}
	return false
}

func matchMissing(line string) *MissingFileError {
	for _, re := range missingFileRe {
		if m := re.FindStringSubmatch(line); m != nil {
			p := strings.TrimRight(m[1], ":,")
			if !strings.HasPrefix(p, "/") {
				p = "/" + p
			}
			return &MissingFileError{Path: p}
		}
	}
	return nil
}

func criuError(op string, err error, logPath string) error {
	lines, missing := explainLog(logPath)
	return &CRIUError{Op: op, Err: err, LogPath: logPath, Lines: lines, Missing: missing}
}

// SeizeStart reads from a dump's CRIU log how long after CRIU's start it was
// about to seize the tree: the time of the last line before "Seized task". The
// tree still ran then, so counting the freeze from CRIU's start plus this never
// counts less than the real downtime, and at most the seize itself (about a
// millisecond) more.
func SeizeStart(logPath string) (d time.Duration, ok bool) {
	b, err := os.ReadFile(logPath)
	if err != nil {
		return 0, false
	}
	var last time.Duration
	var seen bool
	for _, l := range strings.Split(string(b), "\n") {
		var sec, usec int64
		if _, err := fmt.Sscanf(l, "(%d.%d)", &sec, &usec); err != nil {
			continue
		}
		if strings.Contains(l, "Seized task ") {
			return last, seen
		}
		last, seen = time.Duration(sec)*time.Second+time.Duration(usec)*time.Microsecond, true
	}
	return 0, false
}

// SeizeWatch watches a process for the moment a tracer (CRIU) seizes it, which is
// when a dump freezes it, by polling its TracerPid. SeizeStart reads the same
// moment from CRIU's log, but only relative to CRIU's own start, after its exec
// and dynamic loading (several milliseconds).
type SeizeWatch struct {
	stop     chan struct{}
	once     sync.Once
	done     chan struct{}
	untraced time.Time // the last poll that saw it untraced
	seized   bool
}

// WatchSeize starts watching pid (see SeizeWatch).
func WatchSeize(pid int) *SeizeWatch {
	w := &SeizeWatch{stop: make(chan struct{}), done: make(chan struct{})}
	path := fmt.Sprintf("/proc/%d/status", pid)
	go func() {
		defer close(w.done)
		for {
			now := time.Now()
			b, err := os.ReadFile(path)
			if err != nil {
				return
			}
			i := strings.Index(string(b), "TracerPid:")
			if i < 0 {
				return
			}
			f := strings.Fields(string(b[i+len("TracerPid:"):]))
			if len(f) == 0 {
				return
			}
			if f[0] != "0" {
				w.seized = !w.untraced.IsZero() // traced from the start: not ours to judge
				return
			}
			w.untraced = now
			select {
			case <-w.stop:
				return
			case <-time.After(100 * time.Microsecond):
			}
		}
	}()
	return w
}

// Seized stops watching and returns the last moment the process was seen
// running untraced: the freeze came after it, within one poll (~0.1-0.2 ms).
// ok is false when no seize was seen.
func (w *SeizeWatch) Seized() (before time.Time, ok bool) {
	w.once.Do(func() { close(w.stop) })
	<-w.done
	return w.untraced, w.seized
}
