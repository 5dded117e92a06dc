package migrate

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"github.com/sirupsen/logrus"
)

// A client's packets that reach the source while the workload is frozen are dropped
// there, and each client's TCP resends them only after its retransmission timeout
// (200 ms at least): a client with one request in flight waits that long. Where the
// hosts' address controllers can (netfail), the source keeps copies of them from
// the freeze until the destination announced the addresses, and the destination
// replays them into its stack once the restored copy runs (netfail.Manager.Hold and
// Replay). TCP discards any it already had.

// PacketHolder is a VIPController that can hold the packets arriving for service
// addresses.
type PacketHolder interface {
	Hold(vips []string) (HeldPackets, error)
}

// HeldPackets is a capture started by PacketHolder.Hold.
type HeldPackets interface {
	// Stop ends the capture and returns the packets held and how many were left
	// out over its bounds.
	Stop() (pkts [][]byte, dropped int, err error)
}

// PacketReplayer is a VIPController that can hand held packets to this host's stack.
type PacketReplayer interface {
	Replay(pkts [][]byte) (int, error)
}

// Bounds on a replay request.
const (
	maxReplayPackets = 8192
	maxReplayBytes   = 32 << 20
)

// Replay implements Destination: it hands the packets held on the source to this
// host's stack for the migration's restored copy. It returns how many went.
func (t *Target) Replay(ctx context.Context, id string, pkts [][]byte) (int, error) {
	in, err := t.get(id)
	if err != nil {
		return 0, err
	}
	defer t.put(in)
	if !in.restored {
		return 0, fmt.Errorf("replay for %s: nothing was restored", id)
	}
	r, ok := t.VIPs.(PacketReplayer)
	if !ok {
		return 0, fmt.Errorf("replay for %s: this host cannot replay packets", id)
	}
	// Only packets for the workload's own addresses: the agent is no relay for
	// packets to anywhere else.
	ours := map[netip.Addr]bool{}
	for _, v := range in.req.Workload.VIPs {
		if a, ok := vipAddr(v); ok {
			ours[a] = true
		}
	}
	kept := pkts[:0:0]
	for _, p := range pkts {
		if a, ok := packetDestination(p); ok && ours[a] {
			kept = append(kept, p)
		}
	}
	if len(kept) < len(pkts) {
		t.log().WithFields(logrus.Fields{"migration": id, "refused": len(pkts) - len(kept)}).Warn("replay: packets for addresses that are not the workload's")
	}
	return r.Replay(kept)
}

// vipAddr returns the address of a service address spec ("ADDR/BITS@LINK").
func vipAddr(v string) (netip.Addr, bool) {
	spec, _, _ := strings.Cut(v, "@")
	p, err := netip.ParsePrefix(spec)
	if err != nil {
		return netip.Addr{}, false
	}
	return p.Addr().Unmap(), true
}

// packetDestination returns an IPv4 or IPv6 packet's destination address.
func packetDestination(p []byte) (netip.Addr, bool) {
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		return netip.AddrFrom4([4]byte(p[16:20])), true
	case len(p) >= 40 && p[0]>>4 == 6:
		return netip.AddrFrom16([16]byte(p[24:40])).Unmap(), true
	}
	return netip.Addr{}, false
}

// Replay implements Destination.
func (c *Client) Replay(ctx context.Context, id string, pkts [][]byte) (int, error) {
	var resp struct {
		Replayed int `json:"replayed"`
	}
	err := c.call(ctx, http.MethodPost, "/migrations/"+url.PathEscape(id)+"/replay", bytes.NewReader(encodePackets(pkts)), &resp)
	return resp.Replayed, err
}

// encodePackets frames packets as a 4-byte big-endian length before each.
func encodePackets(pkts [][]byte) []byte {
	var b bytes.Buffer
	for _, p := range pkts {
		_ = binary.Write(&b, binary.BigEndian, uint32(len(p)))
		b.Write(p)
	}
	return b.Bytes()
}

// decodePackets reads what encodePackets wrote, within the replay bounds.
func decodePackets(r io.Reader) ([][]byte, error) {
	var pkts [][]byte
	total := 0
	for {
		var n uint32
		if err := binary.Read(r, binary.BigEndian, &n); err != nil {
			if errors.Is(err, io.EOF) {
				return pkts, nil
			}
			return nil, fmt.Errorf("packets: %w", err)
		}
		if n < 20 || n > 65535 {
			return nil, fmt.Errorf("packets: a packet of %d bytes", n)
		}
		if len(pkts) >= maxReplayPackets || total+int(n) > maxReplayBytes {
			return nil, fmt.Errorf("packets: more than %d packets or %d bytes", maxReplayPackets, maxReplayBytes)
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(r, p); err != nil {
			return nil, fmt.Errorf("packets: %w", err)
		}
		pkts = append(pkts, p)
		total += int(n)
	}
}
