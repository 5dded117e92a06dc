package checkpoint

import "testing"

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		out     string
		want    Version
		patched bool
	}{
		{"Version: 4.2.1\n", Version{Major: 4, Minor: 2, Sub: 1}, false},
		{"Version: 3.17\n", Version{Major: 3, Minor: 17}, false},
		{"Version: 4.2.1\nGitID: v4.2-12-gabcdef\n", Version{Major: 4, Minor: 2, Sub: 1, GitID: "v4.2-12-gabcdef"}, false},
		{"Version: 4.2.1\nGitID: duplex-f856522028e5\n", Version{Major: 4, Minor: 2, Sub: 1, GitID: "duplex-f856522028e5"}, true},
	} {
		v, err := parseVersion(tc.out)
		if err != nil {
			t.Fatalf("%q: %v", tc.out, err)
		}
		if v != tc.want || v.DuplexPatched() != tc.patched {
			t.Errorf("%q: got %+v (patched %v), want %+v (patched %v)", tc.out, v, v.DuplexPatched(), tc.want, tc.patched)
		}
	}
	if _, err := parseVersion("criu: command not found\n"); err == nil {
		t.Error("parsed a version out of nothing")
	}
}
