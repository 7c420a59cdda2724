/*
 * The server guest's initramfs: put the root disk under device-mapper, then hand over to
 * the server's own PID 1 on it.
 *
 * The replication agent tracks the writes of a running server with dm-era, which must sit
 * between the root filesystem and its disk; a mounted disk cannot be put under
 * device-mapper afterwards. So this program, the initramfs's /init, loads dm-mod (the
 * modules in /modules.list, in order, with finit_module(2)), makes the device-mapper
 * device "root" as a linear map of the whole disk named by root= (default /dev/nvme0n1),
 * mounts it and executes /sbin/labctl-init there. The agent swaps the linear table for an
 * era table live (dmsetup load, suspend, resume) and back; a reboot comes up linear again,
 * so a tracker never survives one. A failure is printed on the console and powers off.
 *
 * Static C, no library beyond libc: the initramfs holds this, dm-mod.ko and nothing else.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <linux/fs.h>
#include <linux/reboot.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define DM_NAME_ROOT "root"
#define NEW_ROOT "/newroot"
#define NEXT_INIT "/sbin/labctl-init"

static void fail(const char *fmt, ...)
{
    va_list ap;
    fputs("labctl-initramfs: error: ", stdout);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputs("\n", stdout);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static void load_modules(void)
{
    FILE *f = fopen("/modules.list", "r");
    char line[256];
    if (!f)
        fail("/modules.list is missing");
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0])
            continue;
        int fd = open(line, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail("cannot open module %s: %s", line, strerror(errno));
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            fail("loading %s failed: %s", line, strerror(errno));
        close(fd);
    }
    fclose(f);
}

/* root=PATH from the kernel command line, or the NVMe namespace a server boots from */
static void root_path(char *out, size_t n)
{
    char cmdline[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    snprintf(out, n, "/dev/nvme0n1");
    if (fd < 0)
        return;
    ssize_t got = read(fd, cmdline, sizeof cmdline - 1);
    close(fd);
    if (got <= 0)
        return;
    for (char *w = strtok(cmdline, " \n"); w; w = strtok(NULL, " \n"))
        if (strncmp(w, "root=", 5) == 0 && w[5] == '/')
            snprintf(out, n, "%s", w + 5);
}

static void dm_ioctl_init(struct dm_ioctl *io, size_t size, const char *name)
{
    memset(io, 0, size);
    io->version[0] = DM_VERSION_MAJOR;
    io->version[1] = 0;
    io->version[2] = 0;
    io->data_size = (uint32_t)size;
    io->data_start = sizeof *io;
    snprintf(io->name, sizeof io->name, "%s", name);
}

/* the device-mapper device "root": a linear map of all of `disk` (sectors long) */
static dev_t make_linear(int control, dev_t disk, uint64_t sectors)
{
    union {
        struct dm_ioctl io;
        char raw[16384];
    } buf;
    if (ioctl(control, DM_VERSION, (dm_ioctl_init(&buf.io, sizeof buf, ""), &buf)) != 0)
        fail("device-mapper does not answer: %s", strerror(errno));
    dm_ioctl_init(&buf.io, sizeof buf, DM_NAME_ROOT);
    if (ioctl(control, DM_DEV_CREATE, &buf) != 0)
        fail("creating the device-mapper device %s: %s", DM_NAME_ROOT, strerror(errno));
    dev_t made = (dev_t)buf.io.dev;

    dm_ioctl_init(&buf.io, sizeof buf, DM_NAME_ROOT);
    buf.io.target_count = 1;
    struct dm_target_spec *spec = (struct dm_target_spec *)(buf.raw + sizeof buf.io);
    spec->sector_start = 0;
    spec->length = sectors;
    snprintf(spec->target_type, sizeof spec->target_type, "linear");
    char *params = (char *)(spec + 1);
    int len = snprintf(params, 64, "%u:%u 0", major(disk), minor(disk));
    spec->next = (uint32_t)((sizeof *spec + (size_t)len + 1 + 7) & ~(size_t)7);
    if (ioctl(control, DM_TABLE_LOAD, &buf) != 0)
        fail("loading the linear table of %s: %s", DM_NAME_ROOT, strerror(errno));

    dm_ioctl_init(&buf.io, sizeof buf, DM_NAME_ROOT);  /* no DM_SUSPEND_FLAG: resume */
    if (ioctl(control, DM_DEV_SUSPEND, &buf) != 0)
        fail("activating %s: %s", DM_NAME_ROOT, strerror(errno));
    return made;
}

int main(void)
{
    char disk_path[256];
    struct stat st;
    mkdir("/dev", 0755);
    if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL) != 0)
        fail("mounting /dev: %s", strerror(errno));
    if (!freopen("/dev/console", "w", stdout))
        _exit(1);
    mkdir("/proc", 0555);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV, NULL) != 0)
        fail("mounting /proc: %s", strerror(errno));
    load_modules();
    root_path(disk_path, sizeof disk_path);

    /* the disk appears as its driver probes it: wait up to 30 s */
    for (int i = 0; stat(disk_path, &st) != 0; i++) {
        if (i == 3000)
            fail("no root disk %s after 30 s", disk_path);
        struct timespec ten_ms = {0, 10 * 1000 * 1000};
        nanosleep(&ten_ms, NULL);
    }
    if (!S_ISBLK(st.st_mode))
        fail("%s is not a block device", disk_path);
    int fd = open(disk_path, O_RDONLY | O_CLOEXEC);
    uint64_t bytes = 0;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &bytes) != 0)
        fail("cannot read the size of %s: %s", disk_path, strerror(errno));
    close(fd);

    int control = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    if (control < 0)
        fail("/dev/mapper/control: %s", strerror(errno));
    dev_t dm = make_linear(control, st.st_rdev, bytes / 512);
    close(control);

    char node[64];
    snprintf(node, sizeof node, "/dev/dm-%u", minor(dm));
    for (int i = 0; stat(node, &st) != 0; i++) {  /* devtmpfs makes the node */
        if (i == 500)
            fail("no %s after 5 s", node);
        struct timespec ten_ms = {0, 10 * 1000 * 1000};
        nanosleep(&ten_ms, NULL);
    }
    mkdir(NEW_ROOT, 0755);
    /* noinit_itable: the kernel does not zero the inode tables the filesystem's growth at
     * the first boot adds (a clone reads zeros there anyway): tens of MiB of writes a
     * replication would otherwise find and send, as if the application had made them */
    if (mount(node, NEW_ROOT, "ext4", 0, "noinit_itable") != 0)
        fail("mounting %s (over %s) on %s: %s", node, disk_path, NEW_ROOT, strerror(errno));
    printf("labctl-initramfs: %s under device-mapper as %s (%s)\n", disk_path, DM_NAME_ROOT,
           node);
    fflush(stdout);

    umount2("/proc", MNT_DETACH);
    umount2("/dev", MNT_DETACH);
    if (chdir(NEW_ROOT) != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0
        || chdir("/") != 0)
        fail("switching to the root filesystem: %s", strerror(errno));
    char *argv[] = {NEXT_INIT, NULL};
    execv(NEXT_INIT, argv);
    fail("executing %s: %s", NEXT_INIT, strerror(errno));
    return 1;
}
