/*
 * labctl test guest: the whole user space of a workload VM, run as PID 1.
 *
 * It mounts /dev, /proc and /sys, loads the kernel modules listed in
 * /modules.list with finit_module(2), opens the serial console and then,
 * forever:
 *   - prints "HB <counter> <disk_counter>" every labctl.hb_ms ms (10..1000,
 *     default 100; CLOCK_MONOTONIC deadlines, so the period does not drift);
 *   - dirties a working set of labctl.wss MiB at labctl.rate MiB/s, spreading
 *     the page writes evenly over each heartbeat slice;
 *   - once a second writes a counter record to sector 0 of /dev/vda, and
 *     continues from the record it finds there at boot;
 *   - answers console commands: rate <MiB/s>, wss <MiB>, hb <ms>, read, sync,
 *     size (hb changes the heartbeat period from the next slice on).
 *
 * Output lines (each written with one write(2), starting at column 0):
 *   READY | HB <n> <disk> | DISK boot <c> | DISK none | DISK invalid
 *   DISK read <c> | DISK wrote <c> | DISK error <what> <errno>
 *   DISK size <bytes> (the disk's size as the guest kernel sees it, BLKGETSIZE64)
 *   OK rate <n> | OK wss <n> | OK hb <n> | ERR <line>
 * (ERR hb_ms before READY: labctl.hb_ms was out of range, the default is used)
 * <disk> in HB lines is the last counter written (or found at boot), -1 when
 * there is no disk.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define HB_MS_DEFAULT 100  /* one heartbeat slice, unless labctl.hb_ms says otherwise */
#define HB_MS_MIN 10
#define HB_MS_MAX 1000
#define STEPS 10           /* dirtying steps per slice */
#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define SECTOR 512

static int con = -1;
static char *ws;           /* working set */
static size_t ws_pages;
static size_t ws_cursor;
static uint64_t ws_value;
static long rate_mib = 0;  /* MiB/s */
static long hb_ms = HB_MS_DEFAULT; /* heartbeat period */
static int disk = -1;      /* /dev/vda, O_DIRECT */
static int64_t disk_counter = -1;
static unsigned char *sector; /* aligned I/O buffer */

static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    int fd = con >= 0 ? con : 2;
    for (int off = 0; off < n;) {
        ssize_t w = write(fd, buf + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return;
        }
        off += (int)w;
    }
}

static void add_ns(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static long long ns_until(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ns = (long long)(t->tv_sec - now.tv_sec) * 1000000000LL + (t->tv_nsec - now.tv_nsec);
    return ns < 0 ? 0 : ns;
}

/* ---- setup ------------------------------------------------------------- */

static void load_modules(void)
{
    FILE *f = fopen("/modules.list", "r");
    char line[256];
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0])
            continue;
        int fd = open(line, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            say("ERR module %s open errno %d", line, errno);
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            say("ERR module %s load errno %d", line, errno);
        close(fd);
    }
    fclose(f);
}

static long cmdline_long(const char *cmdline, const char *key, long dflt)
{
    size_t klen = strlen(key);
    for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p += klen) {
        if ((p == cmdline || p[-1] == ' ') && p[klen] == '=')
            return strtol(p + klen + 1, NULL, 10);
    }
    return dflt;
}

static long mem_available_mib(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    long kb = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb / 1024;
}

/* Replace the working set by one of `mib` MiB, touched once. 0 on success. */
static int set_wss(long mib)
{
    if (mib < 1)
        return -1;
    long avail = mem_available_mib() + (long)(ws_pages * PAGE / MIB);
    if (avail >= 0 && mib > avail - 24)
        return -1; /* leave room: the OOM killer must never pick PID 1 */
    char *n = mmap(NULL, (size_t)mib * MIB, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (n == MAP_FAILED)
        return -1;
    if (ws)
        munmap(ws, ws_pages * PAGE);
    ws = n;
    ws_pages = (size_t)mib * MIB / PAGE;
    ws_cursor = 0;
    for (size_t i = 0; i < ws_pages; i++)
        *(volatile uint64_t *)(ws + i * PAGE) = ++ws_value;
    return 0;
}

static void dirty(size_t pages)
{
    for (size_t i = 0; i < pages && ws_pages; i++) {
        *(volatile uint64_t *)(ws + ws_cursor * PAGE) = ++ws_value;
        if (++ws_cursor == ws_pages)
            ws_cursor = 0;
    }
}

/* ---- disk counter record ----------------------------------------------- */

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Record: "LABCTLDC" | counter u64 LE | fnv1a64(first 16 bytes) LE. */
static void record_encode(uint64_t counter)
{
    memset(sector, 0, SECTOR);
    memcpy(sector, "LABCTLDC", 8);
    memcpy(sector + 8, &counter, 8);
    uint64_t sum = fnv1a(sector, 16);
    memcpy(sector + 16, &sum, 8);
}

/* 1 valid (counter in *out), 0 no record (all zero), -1 invalid, -2 I/O error. */
static int record_read(uint64_t *out)
{
    if (pread(disk, sector, SECTOR, 0) != SECTOR)
        return -2;
    uint64_t sum;
    memcpy(&sum, sector + 16, 8);
    if (memcmp(sector, "LABCTLDC", 8) == 0 && fnv1a(sector, 16) == sum) {
        memcpy(out, sector + 8, 8);
        return 1;
    }
    for (int i = 0; i < SECTOR; i++)
        if (sector[i])
            return -1;
    return 0;
}

static int record_write(void)
{
    uint64_t next = (uint64_t)(disk_counter < 0 ? 0 : disk_counter) + 1;
    record_encode(next);
    if (pwrite(disk, sector, SECTOR, 0) != SECTOR || fdatasync(disk) != 0) {
        say("DISK error write %d", errno);
        return -1;
    }
    disk_counter = (int64_t)next;
    return 0;
}

static int has_virtio_block(void)
{
    DIR *d = opendir("/sys/bus/virtio/devices");
    struct dirent *e;
    int found = 0;
    if (!d)
        return 0;
    while (!found && (e = readdir(d)) != NULL) {
        char path[300], id[32] = {0};
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        if (read(fd, id, sizeof id - 1) > 0 && strtol(id, NULL, 16) == 2)
            found = 1;
        close(fd);
    }
    closedir(d);
    return found;
}

static void open_disk(void)
{
    struct timespec t = {0, 10000000L};
    for (int i = 0; i < 300; i++) { /* up to 3 s for the device node */
        disk = open("/dev/vda", O_RDWR | O_DIRECT | O_CLOEXEC);
        if (disk >= 0)
            break;
        if (i >= 20 && !has_virtio_block())
            break;
        nanosleep(&t, NULL);
    }
    if (disk < 0) {
        say("DISK none");
        return;
    }
    uint64_t c = 0;
    int r = record_read(&c);
    if (r == -2) {
        say("DISK error read %d", errno);
        c = 0;
    } else if (r == -1) {
        say("DISK invalid");
    }
    disk_counter = (int64_t)(r == 1 ? c : 0);
    say("DISK boot %lld", (long long)disk_counter);
}

static void open_console(void)
{
    const char *names[] = {"/dev/ttyS0", "/dev/console"};
    for (int i = 0; i < 2 && con < 0; i++)
        con = open(names[i], O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (con < 0)
        return;
    struct termios tio;
    if (tcgetattr(con, &tio) == 0) {
        cfmakeraw(&tio); /* no echo, no line editing: the host reads lines */
        tio.c_oflag |= OPOST | ONLCR;
        tcsetattr(con, TCSANOW, &tio);
    }
}

/* ---- console commands -------------------------------------------------- */

static char inbuf[256];
static size_t inlen;

static void command(char *line)
{
    char *arg;
    long n;
    while (*line == ' ')
        line++;
    if (!*line)
        return;
    if (strncmp(line, "rate ", 5) == 0) {
        n = strtol(line + 5, &arg, 10);
        if (arg != line + 5 && *arg == 0 && n >= 0 && n <= 100000) {
            rate_mib = n;
            say("OK rate %ld", n);
            return;
        }
    } else if (strncmp(line, "wss ", 4) == 0) {
        n = strtol(line + 4, &arg, 10);
        if (arg != line + 4 && *arg == 0 && set_wss(n) == 0) {
            say("OK wss %ld", n);
            return;
        }
    } else if (strncmp(line, "hb ", 3) == 0) {
        n = strtol(line + 3, &arg, 10);
        if (arg != line + 3 && *arg == 0 && n >= HB_MS_MIN && n <= HB_MS_MAX) {
            hb_ms = n;
            say("OK hb %ld", n);
            return;
        }
    } else if (strcmp(line, "read") == 0 && disk >= 0) {
        uint64_t c = 0;
        int r = record_read(&c);
        if (r == 1)
            say("DISK read %llu", (unsigned long long)c);
        else if (r == 0)
            say("DISK read 0");
        else if (r == -1)
            say("DISK read invalid");
        else
            say("DISK error read %d", errno);
        return;
    } else if (strcmp(line, "size") == 0 && disk >= 0) {
        uint64_t bytes = 0;
        if (ioctl(disk, BLKGETSIZE64, &bytes) == 0)
            say("DISK size %llu", (unsigned long long)bytes);
        else
            say("DISK error size %d", errno);
        return;
    } else if (strcmp(line, "sync") == 0 && disk >= 0) {
        if (record_write() == 0)
            say("DISK wrote %lld", (long long)disk_counter);
        return;
    }
    say("ERR %s", line);
}

static void poll_console(long long timeout_ns)
{
    struct pollfd p = {.fd = con, .events = POLLIN};
    struct timespec t = {(time_t)(timeout_ns / 1000000000LL), (long)(timeout_ns % 1000000000LL)};
    if (con < 0) {
        nanosleep(&t, NULL);
        return;
    }
    if (ppoll(&p, 1, &t, NULL) <= 0 || !(p.revents & POLLIN))
        return;
    char buf[128];
    ssize_t r = read(con, buf, sizeof buf);
    for (ssize_t i = 0; i < r; i++) {
        char ch = buf[i];
        if (ch == '\r' || ch == '\n') {
            inbuf[inlen] = 0;
            command(inbuf);
            inlen = 0;
        } else if (inlen < sizeof inbuf - 1) {
            inbuf[inlen++] = ch;
        }
    }
}

/* ---- main -------------------------------------------------------------- */

int main(void)
{
    mkdir("/dev", 0755);
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    open_console();
    load_modules();

    char cmdline[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, cmdline, sizeof cmdline - 1) < 0)
            cmdline[0] = 0;
        close(fd);
    }
    rate_mib = cmdline_long(cmdline, "labctl.rate", 0);
    if (rate_mib < 0)
        rate_mib = 0;
    hb_ms = cmdline_long(cmdline, "labctl.hb_ms", HB_MS_DEFAULT);
    if (hb_ms < HB_MS_MIN || hb_ms > HB_MS_MAX) {
        say("ERR hb_ms %ld", hb_ms);
        hb_ms = HB_MS_DEFAULT;
    }
    if (set_wss(cmdline_long(cmdline, "labctl.wss", 64)) != 0 && set_wss(16) != 0)
        say("ERR wss");

    sector = aligned_alloc(4096, 4096);
    open_disk();
    klogctl(8, NULL, 1); /* console loglevel 1: keep kernel lines out of ours */
    say("READY");

    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    uint64_t hb = 0;
    double carry = 0.0;
    long since_write_ms = 0;
    for (;;) {
        say("HB %llu %lld", (unsigned long long)hb, (long long)disk_counter);
        struct timespec slice = next;
        long slice_ms = hb_ms; /* an "hb" command takes effect from the next slice */
        long slice_ns = slice_ms * 1000000L;
        /* pages to dirty in this slice (rate x slice length), spread over STEPS steps */
        double want = (double)rate_mib * (double)MIB / (double)PAGE * (double)slice_ms / 1000.0
                      + carry;
        size_t pages = (size_t)want;
        carry = want - (double)pages;
        for (int s = 1; s <= STEPS; s++) {
            size_t upto = pages * (size_t)s / STEPS;
            size_t before = pages * (size_t)(s - 1) / STEPS;
            dirty(upto - before);
            struct timespec step = slice;
            add_ns(&step, slice_ns / STEPS * s);
            long long ns;
            while ((ns = ns_until(&step)) > 0)
                poll_console(ns);
            poll_console(0);
        }
        hb++;
        since_write_ms += slice_ms; /* the disk record: once a second, whatever the period */
        if (since_write_ms >= 1000) {
            since_write_ms -= 1000;
            if (disk >= 0)
                record_write();
        }
        add_ns(&next, slice_ns);
        /* after a long stall (e.g. a VM pause), restart the schedule from now */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - next.tv_sec > 2)
            next = now;
    }
}
