package migrate

import (
	"context"
	"errors"
	"io"
	"regexp"
	"time"

	"github.com/duplex-ha/duplex/internal/workload"
)

var (
	// ErrRestoreFailed means the destination tried to restore and failed, and has
	// cleaned up: the source may safely resume.
	ErrRestoreFailed = errors.New("restore failed on the destination")
	// ErrOutcomeUnknown means the source could not learn whether the destination's
	// restore succeeded nor cancel it. The source stays frozen (never two live
	// copies); an operator resolves it once the destination is reachable.
	ErrOutcomeUnknown = errors.New("migration outcome unknown")
	// ErrNoMigration means the destination knows no migration of that id.
	ErrNoMigration = errors.New("no such migration")
)

// Destination is the receiving end of migrations, on the target host.
type Destination interface {
	// Capabilities reports what the destination can do.
	Capabilities(ctx context.Context) (Capabilities, error)
	// Prepare runs the destination's pre-flight checks and starts the page server
	// the source's dump sends memory to. Nothing is frozen yet.
	Prepare(ctx context.Context, req PrepareRequest) (PrepareResponse, error)
	// Pages opens the migration's page channel: a byte stream to and from the
	// destination's page server, carried inside the agents' mutual-TLS connection.
	// The source's CRIU speaks the page-server protocol through it.
	Pages(ctx context.Context, id string) (io.ReadWriteCloser, error)
	// RestoreImages receives the non-memory images (an image stream, see
	// WriteImages) and, once every file arrived whole, brings the service addresses
	// up, restores the workload and announces the addresses. The source opens it
	// before the freeze and streams the images as CRIU writes them. A failure
	// that left nothing restored is ErrBadImages (the stream was at fault) or
	// ErrRestoreFailed.
	RestoreImages(ctx context.Context, id string, r io.Reader) (RestoreResponse, error)
	// Replay hands packets held on the source while the workload was frozen to the
	// destination's stack, once the restored copy runs (see PacketHolder).
	Replay(ctx context.Context, id string, pkts [][]byte) (int, error)
	// Commit tells the destination the source is gone: the migration is over.
	Commit(ctx context.Context, id string) error
	// Abort undoes everything the destination did for the migration, including a
	// restored copy. Aborting an unknown id is not an error.
	Abort(ctx context.Context, id string) error
}

// PrepareRequest opens a migration on the destination.
type PrepareRequest struct {
	ID        string          `json:"id"`
	Workload  workload.Record `json:"workload"`
	Strategy  Strategy        `json:"strategy"`
	Source    Capabilities    `json:"source"`
	OpenFiles []string        `json:"open_files,omitempty"` // regular files the tree holds open
	Memory    uint64          `json:"memory"`               // resident bytes of the tree
}

// PrepareResponse acknowledges a prepared migration.
type PrepareResponse struct {
	// PageServer names the destination's page server for logs; memory travels
	// through Pages, never to a listening port.
	PageServer string `json:"page_server"`
	// Reserved is the memory the destination set aside for the incoming pages.
	Reserved int64 `json:"reserved,omitempty"`
}

// Received reports an image stream the destination accepted.
type Received struct {
	Files int   `json:"files"`
	Bytes int64 `json:"bytes"`
}

// RestoreResponse reports a restore on the destination.
type RestoreResponse struct {
	Workload workload.Record `json:"workload"`
	// Durations on the destination, in milliseconds.
	VIPAddMS      float64 `json:"vip_add_ms"`
	RestoreMS     float64 `json:"restore_ms"`      // CRIU's own restore time
	RestoreWallMS float64 `json:"restore_wall_ms"` // the whole CRIU call
	AnnounceMS    float64 `json:"announce_ms"`     // restore done to the first announcement sent
	// LazyStartMS is the start of the lazy-pages daemon before the restore.
	LazyStartMS float64 `json:"lazy_start_ms,omitempty"`
	// WallMS is the whole Restore call on the destination.
	WallMS float64 `json:"wall_ms"`
	// Lazy means the copy runs while its memory is still being filled in; the
	// destination's Commit returns once every page is in place.
	Lazy bool `json:"lazy,omitempty"`
}

var idRe = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,100}$`)

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
