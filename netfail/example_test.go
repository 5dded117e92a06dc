package netfail_test

import (
	"context"
	"fmt"
	"time"

	"github.com/duplex-ha/duplex/netfail"
)

func ExampleParseVIP() {
	v, err := netfail.ParseVIP("10.77.0.100/24@eth0")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(v.Addr.Addr(), v.Addr.Bits(), v.Link)
	_, err = netfail.ParseVIP("10.77.0.100@eth0")
	fmt.Println(err)
	// Output:
	// 10.77.0.100 24 eth0
	// parse VIP "10.77.0.100@eth0": address "10.77.0.100" has no prefix length (want e.g. 10.77.0.100/24)
}

// Move a VIP from the host whose namespace is /run/netns/old to /run/netns/new: the old
// holder stops answering for it before the new one starts, then the new holder tells
// the link at once and again 5 s later.
func ExampleTakeover() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel() // also ends the second burst: keep ctx alive for a.Repeat to get it
	from, err := netfail.New("/run/netns/old")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer from.Close()
	to, err := netfail.New("/run/netns/new")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer to.Close()
	v, _ := netfail.ParseVIP("10.77.0.100/24@eth0")
	tm, err := netfail.Takeover(ctx, from, to, v, netfail.Announce{})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("first announcement after", tm.FirstPacket)
}
