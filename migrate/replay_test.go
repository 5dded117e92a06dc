package migrate

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"

	"github.com/duplex-ha/duplex/internal/workload"
)

func packetTo(dst string) []byte {
	a := netip.MustParseAddr(dst)
	if a.Is4() {
		p := make([]byte, 40)
		p[0] = 0x45
		copy(p[16:20], a.AsSlice())
		return p
	}
	p := make([]byte, 60)
	p[0] = 0x60
	copy(p[24:40], a.AsSlice())
	return p
}

func TestPacketsRoundTrip(t *testing.T) {
	in := [][]byte{packetTo("10.0.0.5"), packetTo("fd00::5")}
	out, err := decodePackets(bytes.NewReader(encodePackets(in)))
	if err != nil || len(out) != 2 || !bytes.Equal(out[0], in[0]) || !bytes.Equal(out[1], in[1]) {
		t.Fatalf("round trip: %d packets, %v", len(out), err)
	}
	for name, b := range map[string][]byte{
		"short packet": binary.BigEndian.AppendUint32(nil, 3),
		"huge packet":  binary.BigEndian.AppendUint32(nil, 1<<20),
		"truncated":    append(binary.BigEndian.AppendUint32(nil, 40), 1, 2, 3),
		"torn length":  {0, 0},
	} {
		if _, err := decodePackets(bytes.NewReader(b)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	var many bytes.Buffer
	for range maxReplayPackets + 1 {
		_ = binary.Write(&many, binary.BigEndian, uint32(20))
		many.Write(make([]byte, 20))
	}
	if _, err := decodePackets(&many); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Errorf("%d packets: %v", maxReplayPackets+1, err)
	}
}

type replayer struct {
	workload.VIPController
	got [][]byte
}

func (r *replayer) Replay(pkts [][]byte) (int, error) {
	r.got = append(r.got, pkts...)
	return len(pkts), nil
}

// The destination replays only packets for the migrated workload's addresses, and
// only once its copy runs.
func TestTargetReplaysOnlyTheWorkloadsPackets(t *testing.T) {
	r := &replayer{}
	tg := &Target{VIPs: r}
	in := &incoming{req: PrepareRequest{ID: "m1", Workload: workload.Record{Spec: workload.Spec{Name: "w",
		VIPs: []string{"10.0.0.5/24@eth0", "fd00::5/64@eth0"}}}}}
	tg.m = map[string]*incoming{"m1": in}
	pkts := [][]byte{packetTo("10.0.0.5"), packetTo("10.0.0.6"), packetTo("fd00::5"), packetTo("192.0.2.1")}
	if _, err := tg.Replay(context.Background(), "m1", pkts); err == nil {
		t.Error("replayed before anything was restored")
	}
	in.restored = true
	n, err := tg.Replay(context.Background(), "m1", pkts)
	if err != nil || n != 2 || len(r.got) != 2 || !bytes.Equal(r.got[0], pkts[0]) || !bytes.Equal(r.got[1], pkts[2]) {
		t.Errorf("replayed %d (%v), got %d packets; want the two for the workload's addresses", n, err, len(r.got))
	}
	if _, err := tg.Replay(context.Background(), "nope", pkts); err == nil {
		t.Error("replayed for an unknown migration")
	}
}
