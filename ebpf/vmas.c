//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// The VMA iterator behind CRIU's smaps copy (checkpoint.SmapsCopy): one record per
// VMA of each process whose PID is in `want`, in address order. Build with
// `go generate ./ebpf`; the generated vmas_x86_bpfel.{go,o} are committed.
//
// The records are compared byte for byte (by duplex before a dump, by duplex's
// CRIU patch during it), so every field, padding included, is always written.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

struct vma_rec {
	__u32 tgid;
	__u32 pad;
	__u64 start;
	__u64 end;
	__u64 flags;
	__u64 pgoff;
	__u64 ino;       // inode number of the mapped file, 0 for none
	__u64 anon_name; // identity of the VMA's anon name, 0 for none
};

// want holds the PIDs (thread-group ids) whose VMAs are reported.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} want SEC(".maps");

// Kernels with CONFIG_ANON_VMA_NAME name anonymous VMAs ("[anon:NAME]" in smaps).
struct vm_area_struct___named {
	struct anon_vma_name *anon_name;
} __attribute__((preserve_access_index));

SEC("iter/task_vma")
int vmas(struct bpf_iter__task_vma *ctx)
{
	struct task_struct *task = ctx->task;
	struct vm_area_struct *vma = ctx->vma;
	struct vma_rec r = {};
	struct file *file;
	__u32 tgid;

	if (!task || !vma)
		return 0;
	tgid = BPF_CORE_READ(task, tgid);
	// Threads share their leader's VMAs: report them once.
	if (BPF_CORE_READ(task, pid) != tgid || !bpf_map_lookup_elem(&want, &tgid))
		return 0;
	r.tgid = tgid;
	r.start = BPF_CORE_READ(vma, vm_start);
	r.end = BPF_CORE_READ(vma, vm_end);
	r.flags = BPF_CORE_READ(vma, vm_flags);
	r.pgoff = BPF_CORE_READ(vma, vm_pgoff);
	file = BPF_CORE_READ(vma, vm_file);
	if (file)
		r.ino = BPF_CORE_READ(file, f_inode, i_ino);
	if (bpf_core_field_exists(((struct vm_area_struct___named *)vma)->anon_name))
		r.anon_name = (__u64)BPF_CORE_READ((struct vm_area_struct___named *)vma, anon_name);
	bpf_seq_write(ctx->meta->seq, &r, sizeof(r));
	return 0;
}
