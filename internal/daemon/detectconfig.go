package daemon

import (
	"time"

	"github.com/duplex-ha/duplex/internal/api"
	"github.com/duplex-ha/duplex/internal/detect"
)

// detectFile is the `detect:` section of the config file; durations are written
// like "30s" or "2m". Unset fields keep the detector's defaults.
type detectFile struct {
	Hold          *api.Duration `json:"hold"`
	MemoryPercent *float64      `json:"memory_percent"`
	BufferPercent *float64      `json:"buffer_percent"`
	LoadPerCPU    *float64      `json:"load_per_cpu"`
	MaxUptime     *api.Duration `json:"max_uptime"`
	TrendWindow   *api.Duration `json:"trend_window"`
	Horizon       *api.Duration `json:"horizon"`
	Alpha         *float64      `json:"alpha"`
	MinSamples    *int          `json:"min_samples"`
	TrendConfirm  *int          `json:"trend_confirm"`
	NoiseFactor   *float64      `json:"noise_factor"`
	// Metrics lists the checks to run: memory, buffers, load, uptime, workload-memory.
	Metrics []string `json:"metrics"`
}

// config turns the file's section into the detector's configuration; detect.New
// validates it and names a bad field.
func (f detectFile) config() detect.Config {
	var c detect.Config
	c.Defaults()
	dur := func(dst *time.Duration, v *api.Duration) {
		if v != nil {
			*dst = time.Duration(*v)
		}
	}
	num := func(dst *float64, v *float64) {
		if v != nil {
			*dst = *v
		}
	}
	dur(&c.Hold, f.Hold)
	num(&c.MemoryPercent, f.MemoryPercent)
	num(&c.BufferPercent, f.BufferPercent)
	num(&c.LoadPerCPU, f.LoadPerCPU)
	dur(&c.MaxUptime, f.MaxUptime)
	dur(&c.TrendWindow, f.TrendWindow)
	dur(&c.Horizon, f.Horizon)
	num(&c.Alpha, f.Alpha)
	if f.MinSamples != nil {
		c.MinSamples = *f.MinSamples
	}
	if f.TrendConfirm != nil {
		c.TrendConfirm = *f.TrendConfirm
	}
	num(&c.NoiseFactor, f.NoiseFactor)
	if f.Metrics != nil {
		c.Metrics = f.Metrics
	}
	return c
}
