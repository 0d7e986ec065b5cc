/* A Workload API peer for tests/tests/workload_binding.rs that re-points its own
 * /proc/self/exe at another file (PR_SET_MM_MAP with exe_fd) before it connects.
 *
 * usage: exe_repoint SOCKET_PATH TARGET MODE
 *   MODE own-userns: this process enters a new user namespace (where it holds
 *                    CAP_CHECKPOINT_RESTORE) and re-points its exe;
 *   MODE clone-vm:   a child sharing this process's memory (CLONE_VM) in a new user
 *                    namespace re-points the shared exe and exits; this process stays
 *                    in the original user namespace.
 * The socket to connect is standard input (the test holds another descriptor of it).
 * It prints "connected PID" once connected, or "refused: WHY" and exits 3 when the
 * kernel does not let it re-point its exe. The kernel refuses to change the exe while
 * the old file is still mapped, so every mapping of the old executable is first moved
 * to an anonymous copy of itself (mremap over it: the code keeps running unchanged).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/prctl.h>

#ifndef PR_SET_MM_MAP
#define PR_SET_MM_MAP 14
#endif

struct mm_map {
	unsigned long long start_code, end_code, start_data, end_data;
	unsigned long long start_brk, brk, start_stack;
	unsigned long long arg_start, arg_end, env_start, env_end;
	unsigned long long *auxv;
	unsigned int auxv_size;
	unsigned int exe_fd;
};

static void refused(const char *what) {
	printf("refused: %s: %s\n", what, strerror(errno));
	fflush(stdout);
	_exit(3);
}

/* Moves every mapping of the running executable to an anonymous copy of itself. */
static void unmap_old_exe(void) {
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n < 0) refused("readlink");
	exe[n] = 0;
	unsigned long starts[64], ends[64];
	int prots[64], count = 0;
	FILE *maps = fopen("/proc/self/maps", "r");
	if (!maps) refused("maps");
	char line[PATH_MAX + 256];
	while (fgets(line, sizeof line, maps) && count < 64) {
		unsigned long s, e;
		char perms[5], path[PATH_MAX];
		path[0] = 0;
		if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %s", &s, &e, perms, path) < 3) continue;
		if (strcmp(path, exe) != 0) continue;
		starts[count] = s;
		ends[count] = e;
		prots[count] = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
			       (perms[2] == 'x' ? PROT_EXEC : 0);
		count++;
	}
	fclose(maps);
	for (int i = 0; i < count; i++) {
		size_t len = ends[i] - starts[i];
		void *copy = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (copy == MAP_FAILED) refused("mmap");
		if (!(prots[i] & PROT_READ)) mprotect((void *)starts[i], len, PROT_READ);
		memcpy(copy, (void *)starts[i], len);
		if (mprotect(copy, len, prots[i])) refused("mprotect");
		if (mremap(copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)starts[i]) == MAP_FAILED)
			refused("mremap");
	}
}

/* The current layout, from /proc/self/stat, as PR_SET_MM_MAP wants it unchanged. */
static void fill_map(struct mm_map *m) {
	char buf[4096];
	int fd = open("/proc/self/stat", O_RDONLY);
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0) refused("stat");
	buf[n] = 0;
	char *p = strrchr(buf, ')') + 2;
	unsigned long long f[64];
	int i = 3;
	for (char *tok = strtok(p, " "); tok && i < 64; tok = strtok(NULL, " "), i++)
		f[i] = strtoull(tok, NULL, 10);
	memset(m, 0, sizeof *m);
	m->start_code = f[26];
	m->end_code = f[27];
	m->start_stack = f[28];
	m->start_data = f[45];
	m->end_data = f[46];
	m->start_brk = f[47];
	m->brk = (unsigned long long)sbrk(0);
	m->arg_start = f[48];
	m->arg_end = f[49];
	m->env_start = f[50];
	m->env_end = f[51];
}

static const char *target;

static int repoint(void *unused) {
	(void)unused;
	int fd = open(target, O_RDONLY | O_CLOEXEC);
	if (fd < 0) refused("open target");
	struct mm_map m;
	fill_map(&m);
	m.exe_fd = fd;
	if (prctl(PR_SET_MM, PR_SET_MM_MAP, &m, sizeof m, 0)) refused("PR_SET_MM_MAP");
	close(fd);
	return 0;
}

int main(int argc, char **argv) {
	if (argc != 4) {
		fprintf(stderr, "usage: exe_repoint SOCKET_PATH TARGET own-userns|clone-vm\n");
		return 2;
	}
	target = argv[2];
	unmap_old_exe();
	if (strcmp(argv[3], "own-userns") == 0) {
		if (unshare(CLONE_NEWUSER)) refused("unshare");
		repoint(NULL);
	} else if (strcmp(argv[3], "clone-vm") == 0) {
		static char stack[1 << 16];
		pid_t child = clone(repoint, stack + sizeof stack, CLONE_VM | CLONE_NEWUSER | SIGCHLD, NULL);
		if (child < 0) refused("clone");
		int status;
		if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			/* The child printed why. */
			fflush(stdout);
			_exit(3);
		}
	} else {
		fprintf(stderr, "unknown mode %s\n", argv[3]);
		return 2;
	}
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
	if (connect(0, (struct sockaddr *)&addr, sizeof addr)) refused("connect");
	printf("connected %d\n", getpid());
	fflush(stdout);
	for (;;) pause();
}
