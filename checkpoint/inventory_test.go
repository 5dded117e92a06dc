package checkpoint

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/inventory"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

func writeInventory(t *testing.T, dir string, e *inventory.InventoryEntry) {
	t.Helper()
	body, err := proto.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	b := binary.LittleEndian.AppendUint32(nil, imgInventoryMagic)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(body)))
	if err := os.WriteFile(filepath.Join(dir, "inventory.img"), append(b, body...), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestSetInventoryNetworkLock(t *testing.T) {
	dir := t.TempDir()
	writeInventory(t, dir, &inventory.InventoryEntry{
		ImgVersion:        proto.Uint32(2),
		FdinfoPerId:       proto.Bool(true),
		RootCgSet:         proto.Uint32(1),
		NetworkLockMethod: proto.Uint32(uint32(rpc.CriuNetworkLockMethod_NFTABLES)),
	})
	if m, err := inventoryNetworkLock(dir); err != nil || m != rpc.CriuNetworkLockMethod_NFTABLES {
		t.Fatalf("method %v, %v; want NFTABLES", m, err)
	}
	if err := setInventoryNetworkLock(dir, rpc.CriuNetworkLockMethod_SKIP); err != nil {
		t.Fatal(err)
	}
	_, _, e, err := readInventory(filepath.Join(dir, "inventory.img"))
	if err != nil {
		t.Fatal(err)
	}
	if e.GetNetworkLockMethod() != uint32(rpc.CriuNetworkLockMethod_SKIP) {
		t.Errorf("method %d after the rewrite, want SKIP", e.GetNetworkLockMethod())
	}
	if e.GetImgVersion() != 2 || !e.GetFdinfoPerId() || e.GetRootCgSet() != 1 {
		t.Errorf("the rewrite lost other fields: %v", e)
	}
	if _, err := os.Stat(filepath.Join(dir, "inventory.img.tmp")); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}

	// Not an inventory: refused, the file untouched.
	other := filepath.Join(t.TempDir())
	junk := []byte("\x19\x43\x56\x54garbage")
	if err := os.WriteFile(filepath.Join(other, "inventory.img"), junk, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := setInventoryNetworkLock(other, rpc.CriuNetworkLockMethod_SKIP); err == nil {
		t.Error("a file without the inventory magic was rewritten")
	}
	if b, _ := os.ReadFile(filepath.Join(other, "inventory.img")); string(b) != string(junk) {
		t.Error("a refused file was changed")
	}
	// A length running past the end.
	b := binary.LittleEndian.AppendUint32(nil, imgInventoryMagic)
	b = binary.LittleEndian.AppendUint32(b, 1000)
	if err := os.WriteFile(filepath.Join(other, "inventory.img"), append(b, 1, 2, 3), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := setInventoryNetworkLock(other, rpc.CriuNetworkLockMethod_SKIP); err == nil {
		t.Error("a truncated inventory was rewritten")
	}
}
