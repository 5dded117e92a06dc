package ebpf

//go:generate go tool bpf2go -tags linux -target amd64 -type event -type mem_val -type sock_key probes probes.c -- -I. -O2 -g
//go:generate go tool bpf2go -tags linux -target amd64 vmas vmas.c -- -I. -O2 -g
