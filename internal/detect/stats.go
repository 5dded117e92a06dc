package detect

import (
	"math"
	"sort"
)

// MannKendall runs the Mann-Kendall trend test on xs (in time order). S is the sum of
// the signs of all later-minus-earlier differences; its variance is corrected for
// ties, Var(S) = [n(n-1)(2n+5) - Σ t(t-1)(2t+5)] / 18 over groups of t equal values;
// z applies the continuity correction, (S-1)/√Var for S > 0, (S+1)/√Var for S < 0,
// 0 otherwise; p is two-sided from the normal approximation. Fewer than two values,
// or no variance (all equal): S = 0, z = 0, p = 1. See Gilbert, Statistical Methods
// for Environmental Pollution Monitoring (1987), §16.4, and Helsel et al., Statistical
// Methods in Water Resources (USGS TM 4-A3, 2020), §8.
func MannKendall(xs []float64) (s float64, z float64, p float64) {
	n := len(xs)
	if n < 2 {
		return 0, 0, 1
	}
	for i := 0; i < n-1; i++ {
		for j := i + 1; j < n; j++ {
			switch d := xs[j] - xs[i]; {
			case d > 0:
				s++
			case d < 0:
				s--
			}
		}
	}
	nf := float64(n)
	v := nf * (nf - 1) * (2*nf + 5)
	sorted := append([]float64(nil), xs...)
	sort.Float64s(sorted)
	for i := 0; i < n; {
		j := i + 1
		for j < n && sorted[j] == sorted[i] {
			j++
		}
		if t := float64(j - i); t > 1 {
			v -= t * (t - 1) * (2*t + 5)
		}
		i = j
	}
	v /= 18
	if v <= 0 {
		return s, 0, 1
	}
	switch {
	case s > 0:
		z = (s - 1) / math.Sqrt(v)
	case s < 0:
		z = (s + 1) / math.Sqrt(v)
	}
	p = math.Erfc(math.Abs(z) / math.Sqrt2)
	return s, z, p
}

// SenSlope returns Sen's (Theil-Sen) slope of xs over ts: the median of the slopes
// (xs[j]-xs[i])/(ts[j]-ts[i]) of all pairs i < j with distinct times. It returns 0 with
// fewer than two usable points and NaN when the lengths differ.
func SenSlope(ts []float64, xs []float64) float64 {
	if len(ts) != len(xs) {
		return math.NaN()
	}
	n := len(xs)
	slopes := make([]float64, 0, n*(n-1)/2)
	for i := 0; i < n-1; i++ {
		for j := i + 1; j < n; j++ {
			if dt := ts[j] - ts[i]; dt != 0 {
				slopes = append(slopes, (xs[j]-xs[i])/dt)
			}
		}
	}
	if len(slopes) == 0 {
		return 0
	}
	return median(slopes)
}

// median sorts v in place and returns its median.
func median(v []float64) float64 {
	sort.Float64s(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// robustSpread is the scale of the residuals of xs around the line with slope b
// (intercept: their median), as 1.4826 × the median absolute deviation: the standard
// deviation for normal noise, unmoved by a few outliers.
func robustSpread(ts, xs []float64, b float64) float64 {
	r := make([]float64, len(xs))
	for i := range xs {
		r[i] = xs[i] - b*ts[i]
	}
	m := median(append([]float64(nil), r...))
	for i := range r {
		r[i] = math.Abs(r[i] - m)
	}
	return 1.4826 * median(r)
}
