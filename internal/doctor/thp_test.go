package doctor

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCheckTHP(t *testing.T) {
	knob := filepath.Join(t.TempDir(), "enabled")
	defer func(old string) { thpKnob = old }(thpKnob)
	thpKnob = knob
	for content, want := range map[string]Status{
		"[always] madvise never\n": OK,
		"always [madvise] never\n": Warn,
		"always madvise [never]\n": Warn,
	} {
		if err := os.WriteFile(knob, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if c := checkTHP(); c.Status != want || c.Detail == "" {
			t.Errorf("%q: %s (%s), want %s", content, c.Status, c.Detail, want)
		}
	}
	thpKnob = filepath.Join(t.TempDir(), "missing")
	if c := checkTHP(); c.Status != Warn {
		t.Errorf("no knob: %s, want warn", c.Status)
	}
}
