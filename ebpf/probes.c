//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// duplex's tracepoint probes. Build with `go generate ./ebpf` (bpf2go); the
// generated probes_x86_bpfel.{go,o} are committed so building duplex needs no clang.
//
// Every probe exists in up to three variants; the loader (probes.go) tries them in
// this order and keeps the first that loads and attaches:
//   tp_btf/...          BTF-typed raw tracepoint: no tracefs, typed arguments
//   raw_tracepoint/...  untyped raw tracepoint: no tracefs (still CO-RE, needs BTF)
//   tracepoint/...      classic tracepoint: needs tracefs, no kernel BTF needed
//                       (its context structs below are spelled out, not CO-RE)

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define PAGE_SHIFT 12

// rss_stat members (enum in include/linux/mm_types_task.h).
#define MM_FILEPAGES 0
#define MM_ANONPAGES 1
#define MM_SWAPENTS 2
#define MM_SHMEMPAGES 3

#define EV_SOCK_EXCEED_BUF_LIMIT 1
#define EV_SOCK_RCVQUEUE_FULL 2
#define EV_OOM_KILL 3

// At most one ring-buffer record per (cgroup, kind) per this many ns.
#define SOCK_EVENT_INTERVAL_NS (100ULL * 1000 * 1000)

struct mem_val {
	__u64 file;	// bytes
	__u64 anon;	// bytes
	__u64 swap;	// bytes
	__u64 shmem;	// bytes
	__u64 updates;	// rss_stat events seen for this process
	__u64 cgroup_id; // cgroup2 inode of the process (last seen)
};

struct sock_key {
	__u64 cgroup_id;
	__u32 kind;
	__u32 pad;
};

struct sock_val {
	__u64 count;   // events of this kind in this cgroup
	__u64 last_ns; // bpf_ktime_get_ns of the last ring-buffer record
};

struct event {
	__u64 ts_ns; // CLOCK_MONOTONIC
	__u64 cgroup_id;
	__u64 count; // sock events: count for (cgroup, kind) so far
	__u32 pid;   // tgid
	__u32 kind;
};

// Puts struct event into BTF so bpf2go emits a Go type for it.
const struct event *unused_event __attribute__((unused));

// Per-process memory, keyed by tgid. LRU so a missed exit cannot fill it.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, __u32);
	__type(value, struct mem_val);
} mem SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct sock_key);
	__type(value, struct sock_val);
} sock_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024); // resized by the loader (Options.RingBufferSize)
} events SEC(".maps");

static __always_inline __u64 task_cgroup_id(struct task_struct *t)
{
	return BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
}

static __always_inline __u64 counter_bytes(struct mm_struct *mm, int member)
{
	// Same value the kmem/rss_stat event reports as "size":
	// percpu_counter_read_positive(&mm->rss_stat[member]) << PAGE_SHIFT.
	// Constant indices only: tp_btf's mm is a trusted pointer, and the verifier
	// refuses a variable offset on it.
	__s64 pages;
	switch (member) {
	case MM_FILEPAGES:
		pages = BPF_CORE_READ(mm, rss_stat[MM_FILEPAGES].count);
		break;
	case MM_ANONPAGES:
		pages = BPF_CORE_READ(mm, rss_stat[MM_ANONPAGES].count);
		break;
	case MM_SWAPENTS:
		pages = BPF_CORE_READ(mm, rss_stat[MM_SWAPENTS].count);
		break;
	case MM_SHMEMPAGES:
		pages = BPF_CORE_READ(mm, rss_stat[MM_SHMEMPAGES].count);
		break;
	default:
		return 0;
	}
	if (pages < 0)
		pages = 0;
	return (__u64)pages << PAGE_SHIFT;
}

static __always_inline void set_member(struct mem_val *v, int member, __u64 bytes)
{
	switch (member) {
	case MM_FILEPAGES:
		v->file = bytes;
		break;
	case MM_ANONPAGES:
		v->anon = bytes;
		break;
	case MM_SWAPENTS:
		v->swap = bytes;
		break;
	case MM_SHMEMPAGES:
		v->shmem = bytes;
		break;
	}
}

static __always_inline int on_rss_stat(struct mm_struct *mm, int member)
{
	if (member < 0 || member > MM_SHMEMPAGES)
		return 0;
	struct task_struct *cur = (struct task_struct *)bpf_get_current_task();
	struct mm_struct *cur_mm = BPF_CORE_READ(cur, mm);
	__u32 tgid;
	__u64 cgid;
	bool own = mm == cur_mm;

	if (own) {
		tgid = bpf_get_current_pid_tgid() >> 32;
		cgid = bpf_get_current_cgroup_id();
	} else {
		// Another task's mm (exit teardown, reclaim, khugepaged, ...):
		// attribute it to the mm's owner, but never create entries for it.
		if (!bpf_core_field_exists(mm->owner))
			return 0;
		struct task_struct *owner = BPF_CORE_READ(mm, owner);
		if (!owner)
			return 0;
		tgid = BPF_CORE_READ(owner, tgid);
		cgid = 0;
	}

	struct mem_val *v = bpf_map_lookup_elem(&mem, &tgid);
	if (!v) {
		if (!own)
			return 0;
		struct mem_val nv = {};
		nv.file = counter_bytes(mm, MM_FILEPAGES);
		nv.anon = counter_bytes(mm, MM_ANONPAGES);
		nv.swap = counter_bytes(mm, MM_SWAPENTS);
		nv.shmem = counter_bytes(mm, MM_SHMEMPAGES);
		nv.updates = 1;
		nv.cgroup_id = cgid;
		bpf_map_update_elem(&mem, &tgid, &nv, BPF_NOEXIST);
		return 0;
	}
	set_member(v, member, counter_bytes(mm, member));
	if (cgid)
		v->cgroup_id = cgid;
	__sync_fetch_and_add(&v->updates, 1);
	return 0;
}

static __always_inline void emit(__u32 kind, __u32 pid, __u64 cgid, __u64 count)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgid;
	e->count = count;
	e->pid = pid;
	e->kind = kind;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int on_sock(__u32 kind, __u64 cgid)
{
	struct sock_key k = { .cgroup_id = cgid, .kind = kind };
	__u64 now = bpf_ktime_get_ns();
	struct sock_val *v = bpf_map_lookup_elem(&sock_stats, &k);
	if (!v) {
		struct sock_val nv = { .count = 1, .last_ns = now };
		bpf_map_update_elem(&sock_stats, &k, &nv, BPF_ANY);
		emit(kind, bpf_get_current_pid_tgid() >> 32, cgid, 1);
		return 0;
	}
	__u64 count = __sync_fetch_and_add(&v->count, 1) + 1;
	__u64 last = v->last_ns;
	if (now - last < SOCK_EVENT_INTERVAL_NS)
		return 0;
	// Two CPUs may both pass the check once; the rate limit is approximate.
	v->last_ns = now;
	emit(kind, bpf_get_current_pid_tgid() >> 32, cgid, count);
	return 0;
}

// The socket's cgroup (where the socket was created), not current's: socket
// events often run in softirq context on behalf of another task.
static __always_inline __u64 sock_cgroup_id(struct sock *sk)
{
	__u64 id = 0;
	if (sk)
		id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	if (!id)
		id = bpf_get_current_cgroup_id();
	return id;
}

static __always_inline int on_oom(struct task_struct *t)
{
	emit(EV_OOM_KILL, BPF_CORE_READ(t, tgid), task_cgroup_id(t), 0);
	return 0;
}

static __always_inline int on_exit(struct task_struct *t)
{
	// Delete the process's entry when its last thread exits (signal->live
	// already decremented when sched_process_exit fires).
	if (BPF_CORE_READ(t, signal, live.counter) != 0)
		return 0;
	__u32 tgid = BPF_CORE_READ(t, tgid);
	bpf_map_delete_elem(&mem, &tgid);
	return 0;
}

/* ---- tp_btf variants ---- */

// The hot path (rss_stat fires on every page fault): BTF-typed pointers are read
// directly, without bpf_probe_read_kernel calls, and the common case is one map
// lookup, one load and two stores.
SEC("tp_btf/rss_stat")
int BPF_PROG(rss_stat_btf, struct mm_struct *mm, int member)
{
	struct task_struct *cur = bpf_get_current_task_btf();
	if (member < 0 || member > MM_SHMEMPAGES || mm != cur->mm)
		return on_rss_stat(mm, member); // rare: someone else's mm
	__u32 tgid = cur->tgid;
	struct mem_val *v = bpf_map_lookup_elem(&mem, &tgid);
	if (!v)
		return on_rss_stat(mm, member); // first event of this process
	__s64 pages;
	switch (member) {
	case MM_FILEPAGES:
		pages = mm->rss_stat[MM_FILEPAGES].count;
		break;
	case MM_ANONPAGES:
		pages = mm->rss_stat[MM_ANONPAGES].count;
		break;
	case MM_SWAPENTS:
		pages = mm->rss_stat[MM_SWAPENTS].count;
		break;
	default:
		pages = mm->rss_stat[MM_SHMEMPAGES].count;
		break;
	}
	set_member(v, member, pages < 0 ? 0 : (__u64)pages << PAGE_SHIFT);
	// Refresh the cgroup now and then: a workload may be moved.
	if ((__sync_fetch_and_add(&v->updates, 1) & 255) == 0)
		v->cgroup_id = bpf_get_current_cgroup_id();
	return 0;
}

SEC("tp_btf/sock_exceed_buf_limit")
int BPF_PROG(sock_exceed_btf, struct sock *sk, struct proto *prot, long allocated, int kind)
{
	return on_sock(EV_SOCK_EXCEED_BUF_LIMIT, sock_cgroup_id(sk));
}

SEC("tp_btf/sock_rcvqueue_full")
int BPF_PROG(sock_rcvqueue_btf, struct sock *sk, struct sk_buff *skb)
{
	return on_sock(EV_SOCK_RCVQUEUE_FULL, sock_cgroup_id(sk));
}

SEC("tp_btf/mark_victim")
int BPF_PROG(mark_victim_btf, struct task_struct *t)
{
	return on_oom(t);
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(process_exit_btf, struct task_struct *t)
{
	return on_exit(t);
}

/* ---- raw tracepoint variants ---- */

SEC("raw_tracepoint/rss_stat")
int rss_stat_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_rss_stat((struct mm_struct *)ctx->args[0], (int)ctx->args[1]);
}

SEC("raw_tracepoint/sock_exceed_buf_limit")
int sock_exceed_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_sock(EV_SOCK_EXCEED_BUF_LIMIT, sock_cgroup_id((struct sock *)ctx->args[0]));
}

SEC("raw_tracepoint/sock_rcvqueue_full")
int sock_rcvqueue_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_sock(EV_SOCK_RCVQUEUE_FULL, sock_cgroup_id((struct sock *)ctx->args[0]));
}

SEC("raw_tracepoint/mark_victim")
int mark_victim_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_oom((struct task_struct *)ctx->args[0]);
}

SEC("raw_tracepoint/sched_process_exit")
int process_exit_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_exit((struct task_struct *)ctx->args[0]);
}

/* ---- classic tracepoint variants (no CO-RE: layouts from the format files) ---- */

struct tp_entry {
	__u16 type;
	__u8 flags;
	__u8 preempt_count;
	__s32 pid;
};

struct tp_rss_stat {
	struct tp_entry ent;
	__u32 mm_id;
	__u32 curr;
	__s32 member;
	long size;
};

struct tp_mark_victim {
	struct tp_entry ent;
	__s32 pid;
};

SEC("tracepoint/kmem/rss_stat")
int rss_stat_tp(struct tp_rss_stat *ctx)
{
	// Without BTF the mm is unknown: only count changes to current's own mm.
	if (!ctx->curr)
		return 0;
	int member = ctx->member;
	if (member < 0 || member > MM_SHMEMPAGES)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 cgid = bpf_get_current_cgroup_id();
	__u64 bytes = ctx->size < 0 ? 0 : (__u64)ctx->size;
	struct mem_val *v = bpf_map_lookup_elem(&mem, &tgid);
	if (!v) {
		struct mem_val nv = { .updates = 1, .cgroup_id = cgid };
		set_member(&nv, member, bytes);
		bpf_map_update_elem(&mem, &tgid, &nv, BPF_NOEXIST);
		return 0;
	}
	set_member(v, member, bytes);
	v->cgroup_id = cgid;
	__sync_fetch_and_add(&v->updates, 1);
	return 0;
}

SEC("tracepoint/sock/sock_exceed_buf_limit")
int sock_exceed_tp(void *ctx)
{
	return on_sock(EV_SOCK_EXCEED_BUF_LIMIT, bpf_get_current_cgroup_id());
}

SEC("tracepoint/sock/sock_rcvqueue_full")
int sock_rcvqueue_tp(void *ctx)
{
	return on_sock(EV_SOCK_RCVQUEUE_FULL, bpf_get_current_cgroup_id());
}

SEC("tracepoint/oom/mark_victim")
int mark_victim_tp(struct tp_mark_victim *ctx)
{
	// The victim's cgroup is not in the event; current is usually the
	// allocating task that triggered the OOM kill, so report 0.
	emit(EV_OOM_KILL, (__u32)ctx->pid, 0, 0);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int process_exit_tp(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if ((__u32)id != tgid)
		return 0;
	bpf_map_delete_elem(&mem, &tgid);
	return 0;
}
