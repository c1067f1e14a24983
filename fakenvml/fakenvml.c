/*
 * A fake libnvidia-ml.so.1 for machines without a GPU.
 *
 * The real nvidia-ml-py binding loads this library by its soname and calls
 * the same C entry points it calls on a real driver, so the exporter's NVML
 * code runs unchanged. State comes from a JSON scenario file named by
 * FAKE_NVML_SCENARIO; it is re-read whenever its inode, mtime or size changes, so a
 * test can rewrite it (atomically, by rename) while the exporter runs.
 *
 * Scenario shape (every key optional):
 * {
 *   "driver_version": "550.54.15",
 *   "init_error": 0,            NVML return code for nvmlInit
 *   "count_error": 0,           NVML return code for nvmlDeviceGetCount
 *   "gpus": [{
 *     "uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
 *     "pci_bus_id": "00000000:18:00.0",
 *     "total": 85899345920, "used": 1073741824, "reserved": 536870912,
 *     "processes": [{"pid": 1234, "used": 1048576}],   used -1: not available
 *     "graphics_processes": [...],
 *     "errors": {"handle": 0, "uuid": 0, "name": 0, "pci": 0,
 *                "memory": 0, "memory_v2": 0, "processes": 0,
 *                "processes_v3": 0, "graphics_processes": 0}
 *       a call name fails every version of that call; a "_v2"/"_v3"
 *       name fails only that version, as an older driver would
 *     "delays_ms": {"memory": 50}   the call takes this long
 *     "hangs": {"memory": 1}        the call does not return while this is set
 *       (a GPU in a bad state: real drivers hang inside NVML, holding its
 *       lock, so every other call waits too); capped at 10 minutes
 *     "mig_mode": 1,             MIG current mode (absent: the GPU has no MIG, NOT_SUPPORTED)
 *     "mig_pending": 1,          pending mode (default: the current one)
 *     "mig_max": 7,              nvmlDeviceGetMaxMigDeviceCount
 *     "mig": [{                  the MIG devices (GPU instance + compute instance) now
 *       "slot": 0,               its index for nvmlDeviceGetMigDeviceHandleByIndex
 *                                (default: its position; an empty slot is NOT_FOUND)
 *       "uuid": "MIG-...", "gi": 1, "ci": 0, "profile": "1g.10gb",
 *       "total": ..., "used": ..., "reserved": ..., "processes": [...],
 *       "errors": {...}, "delays_ms": {...}, "hangs": {...}   as for a GPU
 *     }]
 *     MIG calls' error/delay names: "mig_mode", "mig_count", "mig_handle",
 *     "gpu_instance", "compute_instance", "mig_parent".
 *   }]
 * }
 * A MIG device's handle stands for that instance (its UUID): once the
 * scenario drops the instance the handle fails with INVALID_ARGUMENT, as a
 * destroyed instance's does. With MIG on, the parent's process lists hold
 * every instance's processes with their GPU/compute instance ids, as NVML's.
 * fakeNvmlCallCount(name) tells a test how often a call name was made.
 */
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

/* ---------- a small JSON reader, enough for the scenario ---------- */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;

typedef struct jval {
    jtype type;
    double num;
    char *str;          /* J_STR value */
    struct jval *items; /* J_ARR elements / J_OBJ values */
    char **keys;        /* J_OBJ keys */
    int len;
} jval;

typedef struct {
    const char *p;
    int ok;
} jparser;

static void jskip(jparser *ps) {
    while (*ps->p && isspace((unsigned char)*ps->p)) ps->p++;
}

static int jparse(jparser *ps, jval *out, int depth);

static char *jparse_string(jparser *ps) {
    size_t cap = 16, n = 0;
    char *buf = malloc(cap);
    ps->p++; /* opening quote */
    while (*ps->p && *ps->p != '"') {
        char c = *ps->p++;
        if (c == '\\' && *ps->p) {
            c = *ps->p++;
            if (c == 'n') c = '\n';
            else if (c == 't') c = '\t';
            else if (c == 'u') { /* keep it simple: replace with '?' */
                for (int i = 0; i < 4 && *ps->p; i++) ps->p++;
                c = '?';
            }
        }
        if (n + 2 > cap) buf = realloc(buf, cap *= 2);
        buf[n++] = c;
    }
    if (*ps->p != '"') ps->ok = 0; else ps->p++;
    buf[n] = 0;
    return buf;
}

static int jparse_seq(jparser *ps, jval *out, int is_obj, int depth) {
    char close = is_obj ? '}' : ']';
    int cap = 4;
    out->type = is_obj ? J_OBJ : J_ARR;
    out->items = calloc(cap, sizeof(jval));
    out->keys = is_obj ? calloc(cap, sizeof(char *)) : NULL;
    ps->p++;
    jskip(ps);
    if (*ps->p == close) { ps->p++; return 1; }
    for (;;) {
        if (out->len == cap) {
            cap *= 2;
            out->items = realloc(out->items, cap * sizeof(jval));
            if (is_obj) out->keys = realloc(out->keys, cap * sizeof(char *));
        }
        jskip(ps);
        if (is_obj) {
            if (*ps->p != '"') return ps->ok = 0;
            out->keys[out->len] = jparse_string(ps);
            jskip(ps);
            if (*ps->p != ':') return ps->ok = 0;
            ps->p++;
        }
        memset(&out->items[out->len], 0, sizeof(jval));
        if (!jparse(ps, &out->items[out->len], depth + 1)) return 0;
        out->len++;
        jskip(ps);
        if (*ps->p == ',') { ps->p++; continue; }
        if (*ps->p == close) { ps->p++; return 1; }
        return ps->ok = 0;
    }
}

static int jparse(jparser *ps, jval *out, int depth) {
    if (depth > 32) return ps->ok = 0;
    jskip(ps);
    char c = *ps->p;
    if (c == '{' || c == '[') return jparse_seq(ps, out, c == '{', depth);
    if (c == '"') { out->type = J_STR; out->str = jparse_string(ps); return ps->ok; }
    if (!strncmp(ps->p, "true", 4)) { out->type = J_BOOL; out->num = 1; ps->p += 4; return 1; }
    if (!strncmp(ps->p, "false", 5)) { out->type = J_BOOL; ps->p += 5; return 1; }
    if (!strncmp(ps->p, "null", 4)) { out->type = J_NULL; ps->p += 4; return 1; }
    char *end;
    out->num = strtod(ps->p, &end);
    if (end == ps->p) return ps->ok = 0;
    out->type = J_NUM;
    ps->p = end;
    return 1;
}

static void jfree(jval *v) {
    for (int i = 0; i < v->len; i++) {
        jfree(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->str);
}

static const jval *jget(const jval *obj, const char *key) {
    if (!obj || obj->type != J_OBJ) return NULL;
    for (int i = 0; i < obj->len; i++)
        if (!strcmp(obj->keys[i], key)) return &obj->items[i];
    return NULL;
}

static double jnum(const jval *obj, const char *key, double dflt) {
    const jval *v = jget(obj, key);
    return (v && v->type == J_NUM) ? v->num : dflt;
}

static const char *jstr(const jval *obj, const char *key, const char *dflt) {
    const jval *v = jget(obj, key);
    return (v && v->type == J_STR) ? v->str : dflt;
}

/* ---------- scenario state ---------- */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static jval scenario;
static int have_scenario;
static struct timespec loaded_mtime;
static off_t loaded_size = -1;
static ino_t loaded_ino;
static int initialized;

/* Reload the scenario if the file changed; a file that does not parse keeps
 * the previous state (a test writing it non-atomically is a test bug). */
static void refresh(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (!path || stat(path, &st) != 0) return;
    if (have_scenario && st.st_size == loaded_size && st.st_ino == loaded_ino &&
        st.st_mtim.tv_sec == loaded_mtime.tv_sec &&
        st.st_mtim.tv_nsec == loaded_mtime.tv_nsec)
        return;
    FILE *f = fopen(path, "rb");
    if (!f) return;
    char *buf = malloc(st.st_size + 1);
    size_t n = fread(buf, 1, st.st_size, f);
    fclose(f);
    buf[n] = 0;
    jval parsed = {0};
    jparser ps = {buf, 1};
    if (jparse(&ps, &parsed, 0) && ps.ok && parsed.type == J_OBJ) {
        if (have_scenario) jfree(&scenario);
        scenario = parsed;
        have_scenario = 1;
        loaded_mtime = st.st_mtim;
        loaded_size = st.st_size;
        loaded_ino = st.st_ino;
    } else {
        jfree(&parsed);
    }
    free(buf);
}

static const jval *gpus(void) {
    const jval *g = jget(&scenario, "gpus");
    return (g && g->type == J_ARR) ? g : NULL;
}

static const jval *gpu_at(long idx) {
    const jval *g = gpus();
    return (g && idx >= 0 && idx < g->len) ? &g->items[idx] : NULL;
}

static const jval *mig_list(const jval *gpu) {
    const jval *list = jget(gpu, "mig");
    return (list && list->type == J_ARR) ? list : NULL;
}

/* MIG handles: MIG_BASE + the slot of the instance's UUID in this registry. */
#define MIG_BASE 0x100000
#define MIG_REGISTRY 4096
static char *mig_uuids[MIG_REGISTRY];
static size_t mig_registered;

static nvmlDevice_t mig_handle_for(const char *uuid) {
    for (size_t i = 0; i < mig_registered; i++)
        if (!strcmp(mig_uuids[i], uuid)) return (nvmlDevice_t)(MIG_BASE + i);
    if (mig_registered == MIG_REGISTRY) return NULL;
    mig_uuids[mig_registered] = strdup(uuid);
    return (nvmlDevice_t)(MIG_BASE + mig_registered++);
}

static int is_mig(nvmlDevice_t dev) { return (size_t)dev >= MIG_BASE; }

/* The scenario object behind a handle, a GPU (handle = index + 1) or a MIG
 * instance found by UUID in the current layout; *parent is the GPU's index. */
static const jval *device_of(nvmlDevice_t dev, long *parent) {
    size_t h = (size_t)dev;
    const jval *g = gpus();
    if (!g) return NULL;
    if (!is_mig(dev)) {
        long idx = (long)h - 1;
        if (parent) *parent = idx;
        return gpu_at(idx);
    }
    if (h - MIG_BASE >= mig_registered) return NULL;
    const char *uuid = mig_uuids[h - MIG_BASE];
    for (int i = 0; i < g->len; i++) {
        const jval *list = mig_list(&g->items[i]);
        for (int j = 0; list && j < list->len; j++)
            if (!strcmp(jstr(&list->items[j], "uuid", ""), uuid)) {
                if (parent) *parent = i;
                return &list->items[j];
            }
    }
    return NULL;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* How often each call name was made (for tests of look-up caching). */
#define MAX_COUNTED 64
static char counted_names[MAX_COUNTED][32];
static unsigned long counted[MAX_COUNTED];

static void count_call(const char *call) {
    for (int i = 0; i < MAX_COUNTED; i++) {
        if (!counted_names[i][0]) snprintf(counted_names[i], sizeof(counted_names[i]), "%s", call);
        if (!strcmp(counted_names[i], call)) { counted[i]++; return; }
    }
}

unsigned long fakeNvmlCallCount(const char *call) {
    pthread_mutex_lock(&lock);
    unsigned long n = 0;
    for (int i = 0; i < MAX_COUNTED && counted_names[i][0]; i++)
        if (!strcmp(counted_names[i], call)) n = counted[i];
    pthread_mutex_unlock(&lock);
    return n;
}

/* Injected slowness: "delays_ms" sleeps, "hangs" blocks until the scenario
 * drops it (re-read every 20 ms, the lock held all along, as a hung driver). */
static void stall(nvmlDevice_t dev, const char *call) {
    const jval *obj = device_of(dev, NULL);
    long delay = (long)jnum(jget(obj, "delays_ms"), call, 0);
    if (delay > 0) sleep_ms(delay);
    for (int waited = 0; waited < 30000; waited++) {
        obj = device_of(dev, NULL);
        if (!obj || !jnum(jget(obj, "hangs"), call, 0)) return;
        sleep_ms(20);
        refresh();
    }
}

/* Look up the GPU or MIG instance behind a handle and its injected error for
 * the named call; returns NVML_SUCCESS with *out set, or an error code. */
static nvmlReturn_t gpu_for2(nvmlDevice_t dev, const char *call, const char *variant,
                             const jval **out) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    refresh();
    count_call(call);
    stall(dev, call);
    *out = device_of(dev, NULL);
    if (!*out) return is_mig(dev) ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_GPU_IS_LOST;
    const jval *errors = jget(*out, "errors");
    int err = (int)jnum(errors, call, 0);
    if (!err && variant) err = (int)jnum(errors, variant, 0);
    return err;
}

/* "errors": {call: code} fails every version of a call; {variant: code}
 * fails only that version (e.g. "memory_v2" to mimic an older driver). */
static nvmlReturn_t gpu_for(nvmlDevice_t dev, const char *call, const jval **out) {
    return gpu_for2(dev, call, NULL, out);
}

static nvmlReturn_t copy_str(const char *s, char *buf, unsigned int len) {
    if (!buf) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, s);
    return NVML_SUCCESS;
}

#define LOCKED(body) do { pthread_mutex_lock(&lock); nvmlReturn_t r_ = (body); \
    pthread_mutex_unlock(&lock); return r_; } while (0)

/* ---------- the NVML entry points the binding calls ---------- */

static nvmlReturn_t do_init(void) {
    refresh();
    int err = (int)jnum(&scenario, "init_error", 0);
    if (err) return err;
    initialized = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; LOCKED(do_init()); }
nvmlReturn_t nvmlInit_v2(void) { LOCKED(do_init()); }
nvmlReturn_t nvmlInit(void) { LOCKED(do_init()); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    initialized = 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t do_driver_version(char *buf, unsigned int len) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    refresh();
    return copy_str(jstr(&scenario, "driver_version", "550.54.15"), buf, len);
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned int len) {
    LOCKED(do_driver_version(buf, len));
}

static nvmlReturn_t do_count(unsigned int *count) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    refresh();
    int err = (int)jnum(&scenario, "count_error", 0);
    if (err) return err;
    const jval *g = gpus();
    *count = g ? g->len : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { LOCKED(do_count(count)); }
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { LOCKED(do_count(count)); }

static nvmlReturn_t do_handle(unsigned int index, nvmlDevice_t *dev) {
    const jval *g;
    nvmlReturn_t r = gpu_for((nvmlDevice_t)(size_t)(index + 1), "handle", &g);
    if (r == NVML_ERROR_GPU_IS_LOST) return NVML_ERROR_INVALID_ARGUMENT;
    if (r) return r;
    *dev = (nvmlDevice_t)(size_t)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) { LOCKED(do_handle(i, d)); }
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, nvmlDevice_t *d) { LOCKED(do_handle(i, d)); }

static nvmlReturn_t do_string(nvmlDevice_t dev, const char *call, const char *key,
                              const char *dflt, char *buf, unsigned int len) {
    const jval *g;
    nvmlReturn_t r = gpu_for(dev, call, &g);
    if (r) return r;
    return copy_str(jstr(g, key, dflt), buf, len);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned int len) {
    LOCKED(do_string(d, "uuid", "uuid", "GPU-00000000-0000-0000-0000-000000000000", buf, len));
}

/* A MIG device is named after its parent and profile: "NVIDIA H100 80GB HBM3 MIG 1g.10gb". */
static nvmlReturn_t do_name(nvmlDevice_t dev, char *buf, unsigned int len) {
    const jval *g;
    long parent = -1;
    nvmlReturn_t r = gpu_for(dev, "name", &g);
    if (r) return r;
    if (!is_mig(dev)) return copy_str(jstr(g, "name", "NVIDIA Fake GPU"), buf, len);
    device_of(dev, &parent);
    char name[160];
    snprintf(name, sizeof(name), "%s MIG %s", jstr(gpu_at(parent), "name", "NVIDIA Fake GPU"),
             jstr(g, "profile", "1g.10gb"));
    return copy_str(name, buf, len);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *buf, unsigned int len) { LOCKED(do_name(d, buf, len)); }

/* nvmlPciInfo_t as laid out by NVML >= 9.0. */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

static nvmlReturn_t do_pci(nvmlDevice_t dev, nvmlPciInfo_t *pci) {
    const jval *g;
    long parent = -1;
    nvmlReturn_t r = gpu_for(dev, "pci", &g);
    if (r) return r;
    device_of(dev, &parent);
    g = gpu_at(parent); /* a MIG device is on its parent's bus */
    memset(pci, 0, sizeof(*pci));
    const char *bus_id = jstr(g, "pci_bus_id", "00000000:00:00.0");
    snprintf(pci->busId, sizeof(pci->busId), "%s", bus_id);
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%.15s", bus_id);
    sscanf(bus_id, "%x:%x:%x", &pci->domain, &pci->bus, &pci->device);
    pci->pciDeviceId = 0x233010de;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) { LOCKED(do_pci(d, p)); }
nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t d, nvmlPciInfo_t *p) { LOCKED(do_pci(d, p)); }

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

static nvmlReturn_t do_memory(nvmlDevice_t dev, nvmlMemory_t *m) {
    const jval *g;
    nvmlReturn_t r = gpu_for(dev, "memory", &g);
    if (r) return r;
    /* v1 semantics: used includes the driver-reserved memory. */
    m->total = (unsigned long long)jnum(g, "total", 0);
    m->used = (unsigned long long)(jnum(g, "used", 0) + jnum(g, "reserved", 0));
    m->free = m->total > m->used ? m->total - m->used : 0;
    return NVML_SUCCESS;
}

static nvmlReturn_t do_memory_v2(nvmlDevice_t dev, nvmlMemory_v2_t *m) {
    const jval *g;
    nvmlReturn_t r = gpu_for2(dev, "memory", "memory_v2", &g);
    if (r) return r;
    if (m->version != 0x02000028) return 25; /* NVML_ERROR_ARGUMENT_VERSION_MISMATCH */
    m->total = (unsigned long long)jnum(g, "total", 0);
    m->reserved = (unsigned long long)jnum(g, "reserved", 0);
    m->used = (unsigned long long)jnum(g, "used", 0);
    unsigned long long taken = m->used + m->reserved;
    m->free = m->total > taken ? m->total - taken : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) { LOCKED(do_memory(d, m)); }
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) { LOCKED(do_memory_v2(d, m)); }

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

static unsigned int list_len(const jval *list) { return (list && list->type == J_ARR) ? list->len : 0; }

/* Copy one scenario list in, from position `at`; ids 0xFFFFFFFF outside MIG. */
static unsigned int fill(const jval *list, const jval *instance, nvmlProcessInfo_t *infos, unsigned int at) {
    unsigned int n = list_len(list);
    for (unsigned int i = 0; i < n; i++) {
        const jval *p = &list->items[i];
        double used = jnum(p, "used", 0);
        infos[at + i].pid = (unsigned int)jnum(p, "pid", 0);
        infos[at + i].usedGpuMemory = used < 0 ? ~0ULL : (unsigned long long)used;
        infos[at + i].gpuInstanceId = instance ? (unsigned int)jnum(instance, "gi", 0) : 0xFFFFFFFF;
        infos[at + i].computeInstanceId = instance ? (unsigned int)jnum(instance, "ci", 0) : 0xFFFFFFFF;
    }
    return n;
}

/* NVML's two-call protocol: count first (INSUFFICIENT_SIZE), then fill. A MIG
 * device lists its own processes; a GPU with MIG on lists every instance's too. */
static nvmlReturn_t do_processes(nvmlDevice_t dev, const char *key, const char *variant,
                                 unsigned int *count, nvmlProcessInfo_t *infos) {
    const jval *g;
    nvmlReturn_t r = gpu_for2(dev, key, variant, &g);
    if (r) return r;
    const jval *instances = (!is_mig(dev) && jnum(g, "mig_mode", 0) == 1) ? mig_list(g) : NULL;
    unsigned int n = list_len(jget(g, key));
    for (int i = 0; instances && i < instances->len; i++) n += list_len(jget(&instances->items[i], key));
    if (n == 0) { *count = 0; return NVML_SUCCESS; }
    if (!infos || *count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    unsigned int at = fill(jget(g, key), is_mig(dev) ? g : NULL, infos, 0);
    for (int i = 0; instances && i < instances->len; i++)
        at += fill(jget(&instances->items[i], key), &instances->items[i], infos, at);
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    LOCKED(do_processes(d, "processes", "processes_v3", c, p));
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    LOCKED(do_processes(d, "processes", NULL, c, p));
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    LOCKED(do_processes(d, "graphics_processes", NULL, c, p));
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    LOCKED(do_processes(d, "graphics_processes", NULL, c, p));
}

/* ---------- MIG ---------- */

/* A GPU (not a MIG device) that has MIG at all; NOT_SUPPORTED otherwise. */
static nvmlReturn_t mig_parent(nvmlDevice_t dev, const char *call, const jval **g) {
    nvmlReturn_t r = gpu_for(dev, call, g);
    if (r) return r;
    if (is_mig(dev)) return NVML_ERROR_INVALID_ARGUMENT;
    return jget(*g, "mig_mode") ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
}

static nvmlReturn_t do_mig_mode(nvmlDevice_t dev, unsigned int *current, unsigned int *pending) {
    const jval *g;
    nvmlReturn_t r = mig_parent(dev, "mig_mode", &g);
    if (r) return r;
    *current = (unsigned int)jnum(g, "mig_mode", 0);
    *pending = (unsigned int)jnum(g, "mig_pending", *current);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *c, unsigned int *p) { LOCKED(do_mig_mode(d, c, p)); }

static nvmlReturn_t do_mig_handle(nvmlDevice_t dev, unsigned int index, nvmlDevice_t *mig) {
    const jval *g;
    nvmlReturn_t r = mig_parent(dev, "mig_handle", &g);
    if (r) return r;
    if (!mig || index >= (unsigned int)jnum(g, "mig_max", 7)) return NVML_ERROR_INVALID_ARGUMENT;
    const jval *list = jnum(g, "mig_mode", 0) == 1 ? mig_list(g) : NULL;
    for (int i = 0; list && i < list->len; i++) {
        const jval *instance = &list->items[i];
        if ((unsigned int)jnum(instance, "slot", i) != index) continue;
        *mig = mig_handle_for(jstr(instance, "uuid", ""));
        return *mig ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int i, nvmlDevice_t *m) {
    LOCKED(do_mig_handle(d, i, m));
}

/* The MIG calls that answer one number: "mig_count" (a GPU with MIG), "is_mig",
 * "gpu_instance" and "compute_instance" (a MIG device; NOT_SUPPORTED on a GPU). */
static nvmlReturn_t do_mig_number(nvmlDevice_t dev, const char *call, unsigned int *out) {
    const jval *g;
    int count = !strcmp(call, "mig_count"), ids = !strcmp(call, "gpu_instance") || !strcmp(call, "compute_instance");
    nvmlReturn_t r = count ? mig_parent(dev, call, &g) : gpu_for(dev, call, &g);
    if (r) return r;
    if (ids && !is_mig(dev)) return NVML_ERROR_NOT_SUPPORTED;
    if (count) *out = (unsigned int)jnum(g, "mig_max", 7);
    else if (ids) *out = (unsigned int)jnum(g, !strcmp(call, "gpu_instance") ? "gi" : "ci", 0);
    else *out = is_mig(dev);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *c) { LOCKED(do_mig_number(d, "mig_count", c)); }
nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned int *a) { LOCKED(do_mig_number(d, "is_mig", a)); }
nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned int *id) { LOCKED(do_mig_number(d, "gpu_instance", id)); }
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned int *id) {
    LOCKED(do_mig_number(d, "compute_instance", id));
}

static nvmlReturn_t do_mig_parent_handle(nvmlDevice_t dev, nvmlDevice_t *parent_out) {
    const jval *g;
    long parent = -1;
    nvmlReturn_t r = gpu_for(dev, "mig_parent", &g);
    if (r) return r;
    if (!is_mig(dev)) return NVML_ERROR_INVALID_ARGUMENT;
    device_of(dev, &parent);
    *parent_out = (nvmlDevice_t)(size_t)(parent + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t m, nvmlDevice_t *d) {
    LOCKED(do_mig_parent_handle(m, d));
}
