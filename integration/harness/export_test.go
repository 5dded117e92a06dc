package harness

// FailAt returns o set to make New fail on purpose at the named step ("h1 veth").
func FailAt(o Options, step string) Options {
	o.failAt = step
	return o
}

// ErrInjected is the cause of a failure FailAt asked for.
var ErrInjected = errInjected

// PatternByte exposes the stream's byte pattern to tests.
var PatternByte = patternByte
