package detect

import (
	"math"
	"math/rand"
	"testing"
)

func near(a, b, tol float64) bool { return math.Abs(a-b) <= tol }

// The expected values are worked by hand from the formulas in Gilbert (1987) §16.4:
// Var(S) = [n(n-1)(2n+5) - Σ t(t-1)(2t+5)]/18, z = (S∓1)/√Var(S), p = erfc(|z|/√2).
func TestMannKendall(t *testing.T) {
	for _, tc := range []struct {
		name    string
		xs      []float64
		s, z, p float64
	}{
		// n = 10 strictly increasing: all 45 pairs rise; Var = 10·9·25/18 = 125;
		// z = 44/√125 = 3.93548; p = erfc(3.93548/√2) = 8.3031e-5.
		{"increasing", []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 45, 3.935480, 8.3031e-5},
		{"decreasing", []float64{10, 9, 8, 7, 6, 5, 4, 3, 2, 1}, -45, -3.935480, 8.3031e-5},
		// Ties: 1,2,2,3,3,3,4. S = 6+4+4+1+1+1 = 17 (tied pairs count 0).
		// Var = (7·6·19 - 2·1·9 - 3·2·11)/18 = (798-18-66)/18 = 39.6667 (uncorrected:
		// 44.333); z = 16/√39.6667 = 2.54043; p = 0.011072.
		{"ties", []float64{1, 2, 2, 3, 3, 3, 4}, 17, 2.540429, 0.0110716},
		// 5,3,4,1,2: S = -4 -1 -2 +1 = -6; Var = 5·4·15/18 = 16.667; z = -5/√16.667.
		{"mixed", []float64{5, 3, 4, 1, 2}, -6, -1.224745, 0.220671},
		{"constant", []float64{7, 7, 7, 7, 7, 7}, 0, 0, 1},
		{"one", []float64{7}, 0, 0, 1},
		{"empty", nil, 0, 0, 1},
	} {
		s, z, p := MannKendall(tc.xs)
		if s != tc.s || !near(z, tc.z, 1e-5) || !near(p, tc.p, 1e-6*math.Max(1, tc.p*10)) {
			t.Errorf("%s: MannKendall = (%g, %.6f, %.6g), want (%g, %.6f, %.6g)", tc.name, s, z, p, tc.s, tc.z, tc.p)
		}
	}
}

// With ties the corrected variance is smaller, so z is larger than without correction.
func TestMannKendallTieCorrection(t *testing.T) {
	_, z, _ := MannKendall([]float64{1, 2, 2, 3, 3, 3, 4})
	uncorrected := 16 / math.Sqrt(7*6*19/18.0)
	if !(z > uncorrected) {
		t.Errorf("z %g with ties is not above the uncorrected %g", z, uncorrected)
	}
}

func TestSenSlope(t *testing.T) {
	ts := make([]float64, 50)
	xs := make([]float64, 50)
	rng := rand.New(rand.NewSource(1))
	for i := range ts {
		ts[i] = float64(i) * 2 // every 2 s
		xs[i] = 100 + 3*ts[i] + rng.NormFloat64()
	}
	// Gross outliers in 10 % of the points barely move the median of pairwise slopes.
	for _, i := range []int{3, 11, 20, 31, 47} {
		xs[i] += 1e6
	}
	if b := SenSlope(ts, xs); !near(b, 3, 0.1) {
		t.Errorf("Sen's slope %g, want about 3", b)
	}
	if b := SenSlope([]float64{0, 1, 2}, []float64{5, 5, 5}); b != 0 {
		t.Errorf("flat: %g", b)
	}
	if b := SenSlope([]float64{0, 1}, []float64{1}); !math.IsNaN(b) {
		t.Errorf("length mismatch: %g, want NaN", b)
	}
	if b := SenSlope([]float64{1, 1}, []float64{1, 2}); b != 0 {
		t.Errorf("same times: %g, want 0", b)
	}
}
