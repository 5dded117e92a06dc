package integration

import "github.com/duplex-ha/duplex/checkpoint"

func checkpointPath() string { return checkpoint.FindCRIU() }
