package checkpoint

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/inventory"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// An inventory image is the inventory magic, then one length-prefixed
// InventoryEntry (little-endian; unlike other images, no common magic first). (go-criu's crit package
// reads it too, but cannot be linked beside go-criu's stats package: both
// register "stats/stats.proto".)
const imgInventoryMagic = 0x58313116

// setInventoryNetworkLock rewrites the network-lock method recorded in dir's
// inventory image. A restore takes the method from the images, not from its
// options, so this is the only way to restore without one (LockSkip): in CRIU's
// nftables mode a restore locks nothing and afterwards deletes the dump's table,
// which on another host does not exist and costs ~15 ms of nft set-up to find out.
func setInventoryNetworkLock(dir string, lock rpc.CriuNetworkLockMethod) error {
	path := filepath.Join(dir, "inventory.img")
	b, n, e, err := readInventory(path)
	if err != nil {
		return err
	}
	if e.NetworkLockMethod != nil && *e.NetworkLockMethod == uint32(lock) {
		return nil
	}
	e.NetworkLockMethod = proto.Uint32(uint32(lock))
	body, err := proto.Marshal(e)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var out bytes.Buffer
	out.Write(b[:4])
	_ = binary.Write(&out, binary.LittleEndian, uint32(len(body)))
	out.Write(body)
	out.Write(b[8+n:]) // nothing follows today; keep whatever might
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, out.Bytes(), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// inventoryNetworkLock reads the network-lock method dir's inventory records.
func inventoryNetworkLock(dir string) (rpc.CriuNetworkLockMethod, error) {
	_, _, e, err := readInventory(filepath.Join(dir, "inventory.img"))
	if err != nil {
		return 0, err
	}
	return rpc.CriuNetworkLockMethod(e.GetNetworkLockMethod()), nil
}

// readInventory returns the image's bytes, its entry's length and the entry.
func readInventory(path string) ([]byte, int, *inventory.InventoryEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, nil, err
	}
	le := binary.LittleEndian
	if len(b) < 8 || le.Uint32(b) != imgInventoryMagic {
		return nil, 0, nil, fmt.Errorf("%s: not an inventory image", path)
	}
	n := int(le.Uint32(b[4:]))
	if n > len(b)-8 {
		return nil, 0, nil, fmt.Errorf("%s: truncated", path)
	}
	e := &inventory.InventoryEntry{}
	if err := proto.Unmarshal(b[8:8+n], e); err != nil {
		return nil, 0, nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, n, e, nil
}
