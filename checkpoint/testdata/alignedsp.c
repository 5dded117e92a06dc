/*
 * alignedsp: a process with 64 MiB of anonymous memory and a thread that spins
 * with its stack pointer page aligned, as a thread that has just started may
 * have it. CRIU's is_stack() took every page for a stack page then, and a lazy
 * dump made none of them lazy (see contrib/criu/lazy-no-stack-pages.patch).
 * Prints "READY" once set up.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

static char *stack;

static void *spin(void *arg)
{
	unsigned long top = ((unsigned long)stack + (1 << 20)) & ~4095UL;

	asm volatile("mov %0, %%rsp\n1: pause\njmp 1b\n" : : "r"(top));
	return arg;
}

int main(void)
{
	size_t size = 64 << 20;
	char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	pthread_t t;

	stack = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || stack == MAP_FAILED)
		return 1;
	memset(mem, 5, size);
	if (pthread_create(&t, NULL, spin, NULL))
		return 1;
	printf("READY\n");
	fflush(stdout);
	for (;;)
		pause();
}
