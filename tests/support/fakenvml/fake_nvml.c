/*
 * A fake libnvidia-ml.so.1 for testing the NVML power source without a GPU.
 *
 * It exports the few NVML entry points metering/sources/nvml.py reaches through the real
 * nvidia-ml-py binding (pynvml), with the same C signatures and return codes as nvml.h.
 * Behaviour is scripted by a text file named by $FAKE_NVML_SCRIPT, read at call time (never
 * at load time) and re-read whenever its path, mtime (ns) or size changes: one stat() per
 * call. Format (one directive per line, '#' starts a comment):
 *
 *   init <code>                      nvmlInit* returns this nvmlReturn_t (0 = success)
 *   device <index> key=value ...     one GPU; the device count is the number of these lines
 *
 * Device keys: name, uuid, energy_mj, energy_rate_mw, counter_period_ms, power_mw,
 * instant_mw, counter=0|1, lost=0|1, fail_after=N, limit_mw, min_limit_mw, max_limit_mw,
 * default_limit_mw, set_limit=0|1, set_fail_after=N, energy_latency_us, instant_latency_us,
 * power_latency_us, latency_mode=spin|sleep, hang_energy=0|1, hang=0|1. See tests/support/fakenvml/__init__.py
 * for what each means; set_fail_after=N (not listed there yet): after N successful
 * nvmlDeviceSetPowerManagementLimit calls on the device (counted since the script was loaded),
 * every further set returns NVML_ERROR_GPU_IS_LOST and changes nothing, while reads still work.
 *
 * Latency: a real driver takes its time (an H100: the energy counter 2.8-3.1 ms p50 and up to
 * 16 ms p99, the instant power field 2.5-4.3 us, GetPowerUsage 1.1-1.8 us). A latency knob is
 * "P50" or "P50:P99" in microseconds; about 1.5 % of calls take P99, the rest P50 +- 10 %
 * (a deterministic pseudo-random sequence). The delay is spent after the call's work and
 * outside the library's lock, so concurrent callers do not queue behind one another; with
 * latency_mode=spin (the default) it burns that much of the calling thread's own CPU time,
 * as the real counter read does, and with sleep it blocks without using CPU. hang_energy=1
 * makes every energy counter read (and the energy field) block until the script says 0:
 * a hung driver, for tests that nothing waits on a read; hang=1 does the same to every power
 * and energy read of the device. fakeNvmlBlockedCalls() says how many calls wait so now.
 * One extra export, fakeNvmlInitRefs(), tells tests whether nvmlInit/nvmlShutdown balance.
 *
 * No $FAKE_NVML_SCRIPT at all behaves like a machine whose driver is not loaded
 * (nvmlInit -> NVML_ERROR_DRIVER_NOT_LOADED), so a process that has this library loaded
 * but no script sees "no NVIDIA GPU". An unreadable or malformed script makes every call
 * return NVML_ERROR_UNKNOWN (and says why on stderr), so a typo in a test cannot pass.
 *
 * Build: gcc -O2 -fvisibility=hidden -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 fake_nvml.c
 */

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

#define NVML_FI_DEV_POWER_INSTANT 186
#define NVML_VALUE_TYPE_UNSIGNED_INT 1
#define NVML_VALUE_TYPE_UNSIGNED_LONG_LONG 3

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    signed int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

#define MAX_DEVICES 64
#define NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION 83

struct latency {
    unsigned long long p50_us, p99_us; /* 0: no delay */
};
#define TEXT_LEN 96

struct fake_device {
    int present;
    unsigned int index;
    char name[TEXT_LEN];
    char uuid[TEXT_LEN];
    unsigned long long energy_mj;
    unsigned long long energy_rate_mw;
    unsigned long long counter_period_ms;
    unsigned int power_mw;
    int has_instant;
    unsigned int instant_mw;
    int counter;
    int lost;
    long long fail_after; /* < 0: never */
    long long calls_ok;   /* successful energy/power calls since the script was loaded */
    unsigned int limit_mw, min_limit_mw, max_limit_mw, default_limit_mw;
    int set_limit;
    long long set_fail_after; /* < 0: never */
    long long sets_ok;        /* successful limit sets since the script was loaded */
    struct latency energy_latency, instant_latency, power_latency;
    int latency_spin; /* 1: burn CPU for the delay; 0: sleep */
    int hang_energy, hang_all;
};
typedef struct fake_device *nvmlDevice_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct fake_device devices[MAX_DEVICES];
static unsigned int device_count;
static int init_code;
static int script_ok;         /* 1 when the loaded script parsed */
static int script_missing;    /* 1 when $FAKE_NVML_SCRIPT is unset */
static int have_loaded;       /* 0 until the first load attempt */
static char loaded_path[4096];
static long long loaded_mtime_ns = -1;
static long long loaded_size = -1;
static unsigned long long loaded_at_ns; /* CLOCK_MONOTONIC when the script was (re)loaded */
static unsigned int init_refs;          /* nvmlInit minus nvmlShutdown calls */

static unsigned long long monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static void device_defaults(struct fake_device *d, unsigned int index) {
    memset(d, 0, sizeof(*d));
    d->present = 1;
    d->index = index;
    snprintf(d->name, sizeof d->name, "Fake GPU %u", index);
    snprintf(d->uuid, sizeof d->uuid, "GPU-fake-%04u", index);
    d->counter = 1;
    d->fail_after = -1;
    d->limit_mw = 300000;
    d->min_limit_mw = 100000;
    d->max_limit_mw = 400000;
    d->default_limit_mw = 300000;
    d->set_limit = 1;
    d->set_fail_after = -1;
    d->latency_spin = 1;
}

static int parse_ull(const char *text, unsigned long long *out) {
    char *end;
    errno = 0;
    if (*text == '-' || *text == '\0') return 0;
    *out = strtoull(text, &end, 10);
    return errno == 0 && *end == '\0';
}

static int parse_flag(const char *text, int *out) {
    if (strcmp(text, "0") == 0) { *out = 0; return 1; }
    if (strcmp(text, "1") == 0) { *out = 1; return 1; }
    return 0;
}

/* "P50" or "P50:P99", microseconds. */
static int parse_latency(const char *text, struct latency *out) {
    char buf[64];
    char *colon;
    if (strlen(text) >= sizeof buf) return 0;
    snprintf(buf, sizeof buf, "%s", text);
    colon = strchr(buf, ':');
    if (colon != NULL) *colon = '\0';
    if (!parse_ull(buf, &out->p50_us)) return 0;
    if (colon == NULL) {
        out->p99_us = out->p50_us;
        return 1;
    }
    return parse_ull(colon + 1, &out->p99_us) && out->p99_us >= out->p50_us;
}

static int parse_device_key(struct fake_device *d, const char *key, const char *value) {
    unsigned long long n;
    if (strcmp(key, "energy_latency_us") == 0) return parse_latency(value, &d->energy_latency);
    if (strcmp(key, "instant_latency_us") == 0) return parse_latency(value, &d->instant_latency);
    if (strcmp(key, "power_latency_us") == 0) return parse_latency(value, &d->power_latency);
    if (strcmp(key, "hang_energy") == 0) return parse_flag(value, &d->hang_energy);
    if (strcmp(key, "hang") == 0) return parse_flag(value, &d->hang_all);
    if (strcmp(key, "latency_mode") == 0) {
        if (strcmp(value, "spin") == 0) { d->latency_spin = 1; return 1; }
        if (strcmp(value, "sleep") == 0) { d->latency_spin = 0; return 1; }
        return 0;
    }
    if (strcmp(key, "name") == 0) { snprintf(d->name, sizeof d->name, "%s", value); return 1; }
    if (strcmp(key, "uuid") == 0) { snprintf(d->uuid, sizeof d->uuid, "%s", value); return 1; }
    if (strcmp(key, "counter") == 0) return parse_flag(value, &d->counter);
    if (strcmp(key, "lost") == 0) return parse_flag(value, &d->lost);
    if (strcmp(key, "set_limit") == 0) return parse_flag(value, &d->set_limit);
    if (!parse_ull(value, &n)) return 0;
    if (strcmp(key, "energy_mj") == 0) d->energy_mj = n;
    else if (strcmp(key, "energy_rate_mw") == 0) d->energy_rate_mw = n;
    else if (strcmp(key, "counter_period_ms") == 0) d->counter_period_ms = n;
    else if (strcmp(key, "power_mw") == 0) d->power_mw = (unsigned int)n;
    else if (strcmp(key, "instant_mw") == 0) { d->has_instant = 1; d->instant_mw = (unsigned int)n; }
    else if (strcmp(key, "fail_after") == 0) d->fail_after = (long long)n;
    else if (strcmp(key, "limit_mw") == 0) d->limit_mw = (unsigned int)n;
    else if (strcmp(key, "min_limit_mw") == 0) d->min_limit_mw = (unsigned int)n;
    else if (strcmp(key, "max_limit_mw") == 0) d->max_limit_mw = (unsigned int)n;
    else if (strcmp(key, "default_limit_mw") == 0) d->default_limit_mw = (unsigned int)n;
    else if (strcmp(key, "set_fail_after") == 0) d->set_fail_after = (long long)n;
    else return 0;
    return 1;
}

/* Parse the script into the globals; 1 on success, 0 (with a message on stderr) if not. */
static int parse_script(FILE *f, const char *path) {
    char line[1024];
    int lineno = 0;
    memset(devices, 0, sizeof devices);
    device_count = 0;
    init_code = NVML_SUCCESS;
    while (fgets(line, sizeof line, f) != NULL) {
        char *save = NULL, *word;
        char *hash = strchr(line, '#');
        lineno++;
        if (hash != NULL) *hash = '\0';
        word = strtok_r(line, " \t\r\n", &save);
        if (word == NULL) continue;
        if (strcmp(word, "init") == 0) {
            char *code = strtok_r(NULL, " \t\r\n", &save);
            unsigned long long n;
            if (code == NULL || !parse_ull(code, &n) || strtok_r(NULL, " \t\r\n", &save)) {
                fprintf(stderr, "fake_nvml: %s:%d: expected 'init <code>'\n", path, lineno);
                return 0;
            }
            init_code = (int)n;
        } else if (strcmp(word, "device") == 0) {
            char *index_text = strtok_r(NULL, " \t\r\n", &save);
            unsigned long long index;
            struct fake_device *d;
            char *pair;
            if (index_text == NULL || !parse_ull(index_text, &index) || index >= MAX_DEVICES) {
                fprintf(stderr, "fake_nvml: %s:%d: expected 'device <index 0..%d>'\n", path,
                        lineno, MAX_DEVICES - 1);
                return 0;
            }
            d = &devices[index];
            if (d->present) {
                fprintf(stderr, "fake_nvml: %s:%d: device %llu twice\n", path, lineno, index);
                return 0;
            }
            device_defaults(d, (unsigned int)index);
            device_count++;
            while ((pair = strtok_r(NULL, " \t\r\n", &save)) != NULL) {
                char *eq = strchr(pair, '=');
                if (eq == NULL) {
                    fprintf(stderr, "fake_nvml: %s:%d: expected key=value, got '%s'\n", path,
                            lineno, pair);
                    return 0;
                }
                *eq = '\0';
                if (!parse_device_key(d, pair, eq + 1)) {
                    fprintf(stderr, "fake_nvml: %s:%d: bad device key or value '%s=%s'\n",
                            path, lineno, pair, eq + 1);
                    return 0;
                }
            }
        } else {
            fprintf(stderr, "fake_nvml: %s:%d: unknown directive '%s'\n", path, lineno, word);
            return 0;
        }
    }
    return 1;
}

/* Bring the in-memory state up to date with the script. Called with the lock held. */
static void refresh(void) {
    const char *path = getenv("FAKE_NVML_SCRIPT");
    struct stat st;
    long long mtime_ns, size;
    FILE *f;
    if (path == NULL || *path == '\0') {
        if (!script_missing) {
            script_missing = 1;
            have_loaded = 1;
            loaded_path[0] = '\0';
            loaded_mtime_ns = -1;
            loaded_size = -1;
            memset(devices, 0, sizeof devices);
            device_count = 0;
        }
        return;
    }
    if (stat(path, &st) != 0) {
        mtime_ns = -2;
        size = -2;
    } else {
        mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000ll + st.st_mtim.tv_nsec;
        size = (long long)st.st_size;
    }
    if (have_loaded && !script_missing && mtime_ns == loaded_mtime_ns && size == loaded_size &&
        strcmp(path, loaded_path) == 0)
        return;
    have_loaded = 1;
    script_missing = 0;
    snprintf(loaded_path, sizeof loaded_path, "%s", path);
    loaded_mtime_ns = mtime_ns;
    loaded_size = size;
    loaded_at_ns = monotonic_ns();
    f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "fake_nvml: cannot read FAKE_NVML_SCRIPT %s: %s\n", path,
                strerror(errno));
        script_ok = 0;
        return;
    }
    script_ok = parse_script(f, path);
    fclose(f);
}

/* Refresh, then the return code every call after nvmlInit shares (lock held). */
static nvmlReturn_t enter_initialised(void) {
    refresh();
    if (!script_missing && !script_ok) return NVML_ERROR_UNKNOWN;
    if (init_refs == 0) return NVML_ERROR_UNINITIALIZED;
    return NVML_SUCCESS;
}

/* Check a handle; on success *out is the device (lock held). */
static nvmlReturn_t enter_device(nvmlDevice_t handle, struct fake_device **out) {
    nvmlReturn_t ret = enter_initialised();
    if (ret != NVML_SUCCESS) return ret;
    uintptr_t address = (uintptr_t)handle, first = (uintptr_t)devices;
    if (address < first || address >= first + sizeof devices ||
        (address - first) % sizeof devices[0] != 0 || !handle->present)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (handle->lost) return NVML_ERROR_GPU_IS_LOST;
    if (handle->fail_after >= 0 && handle->calls_ok >= handle->fail_after)
        return NVML_ERROR_GPU_IS_LOST;
    *out = handle;
    return NVML_SUCCESS;
}

/* The delay a call takes, chosen under the lock (the PRNG is shared), spent outside it. */
struct delay {
    unsigned long long us;
    int spin;
};

static unsigned long long prng_state = 0x9E3779B97F4A7C15ull;

static unsigned long long prng_next(void) { /* xorshift64*: deterministic, no libc state */
    prng_state ^= prng_state >> 12;
    prng_state ^= prng_state << 25;
    prng_state ^= prng_state >> 27;
    return prng_state * 2685821657736338717ull;
}

static struct delay pick_delay(const struct fake_device *d, const struct latency *l) {
    struct delay out = {0, d->latency_spin};
    unsigned long long r;
    if (l->p50_us == 0 && l->p99_us == 0) return out;
    r = prng_next() % 1000u;
    if (r < 15u) {
        out.us = l->p99_us; /* the tail: 1.5 % of calls */
    } else {
        /* P50 +- 10 %, evenly spread. */
        unsigned long long spread = l->p50_us / 5u;
        out.us = l->p50_us - l->p50_us / 10u + (spread ? prng_next() % (spread + 1u) : 0u);
    }
    return out;
}

static unsigned long long thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static void spend(struct delay delay) {
    if (delay.us == 0) return;
    if (delay.spin) {
        /* Burn this thread's own CPU time: what the caller pays is the same on a busy
         * machine as on an idle one (wall time stretches instead). */
        unsigned long long until = thread_cpu_ns() + delay.us * 1000ull;
        while (thread_cpu_ns() < until) {
        }
    } else {
        struct timespec ts = {(time_t)(delay.us / 1000000ull), (long)(delay.us % 1000000ull) * 1000l};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

static unsigned int blocked_calls; /* calls waiting in wait_while_hung now */

/* Block while the script holds hang=1 (any read) or, for an energy read, hang_energy=1 for
 * the device; the script is re-read every millisecond. */
static void wait_while_hung(nvmlDevice_t device, int energy) {
    int counted = 0;
    for (;;) {
        int hung;
        struct timespec ms = {0, 1000000l};
        pthread_mutex_lock(&lock);
        refresh();
        hung = device->present && (device->hang_all || (energy && device->hang_energy));
        if (hung && !counted) blocked_calls++;
        if (!hung && counted) blocked_calls--;
        pthread_mutex_unlock(&lock);
        if (!hung) return;
        counted = 1;
        nanosleep(&ms, NULL);
    }
}

#define LOCKED(expr)                        \
    do {                                    \
        nvmlReturn_t locked_ret;            \
        pthread_mutex_lock(&lock);          \
        locked_ret = (expr);                \
        pthread_mutex_unlock(&lock);        \
        return locked_ret;                  \
    } while (0)

static nvmlReturn_t do_init(void) {
    refresh();
    if (script_missing) return NVML_ERROR_DRIVER_NOT_LOADED;
    if (!script_ok) return NVML_ERROR_UNKNOWN;
    if (init_code != NVML_SUCCESS) return init_code;
    init_refs++;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    LOCKED(do_init());
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { LOCKED(do_init()); }

EXPORT nvmlReturn_t nvmlInit(void) { LOCKED(do_init()); }

static nvmlReturn_t do_shutdown(void) {
    if (init_refs == 0) return NVML_ERROR_UNINITIALIZED;
    init_refs--;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlShutdown(void) { LOCKED(do_shutdown()); }

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t do_count(unsigned int *count) {
    nvmlReturn_t ret = enter_initialised();
    if (ret != NVML_SUCCESS) return ret;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = device_count;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { LOCKED(do_count(count)); }

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { LOCKED(do_count(count)); }

static nvmlReturn_t do_handle(unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t ret = enter_initialised();
    if (ret != NVML_SUCCESS) return ret;
    if (device == NULL || index >= MAX_DEVICES || !devices[index].present)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    LOCKED(do_handle(index, device));
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    LOCKED(do_handle(index, device));
}

static nvmlReturn_t copy_text(const char *text, char *out, unsigned int length) {
    if (out == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

static nvmlReturn_t do_name(nvmlDevice_t device, char *name, unsigned int length, int uuid) {
    struct fake_device *d;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    return copy_text(uuid ? d->uuid : d->name, name, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    LOCKED(do_name(device, name, length, 0));
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    LOCKED(do_name(device, uuid, length, 1));
}

static nvmlReturn_t do_energy(nvmlDevice_t device, unsigned long long *energy) {
    struct fake_device *d;
    unsigned long long elapsed_ns, period_ns;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    if (!d->counter) return NVML_ERROR_NOT_SUPPORTED;
    if (energy == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    elapsed_ns = monotonic_ns() - loaded_at_ns;
    period_ns = d->counter_period_ms * 1000000ull;
    if (period_ns > 0) elapsed_ns -= elapsed_ns % period_ns;
    /* mW x ns = 1e-12 J = 1e-9 mJ; 128-bit so hours at kilowatts cannot overflow. */
    *energy = d->energy_mj +
              (unsigned long long)((unsigned __int128)d->energy_rate_mw * elapsed_ns /
                                   1000000000u);
    d->calls_ok++;
    return NVML_SUCCESS;
}

/* The handle is checked before it is dereferenced outside the lock. */
static int valid_handle(nvmlDevice_t handle) {
    uintptr_t address = (uintptr_t)handle, first = (uintptr_t)devices;
    return address >= first && address < first + sizeof devices &&
           (address - first) % sizeof devices[0] == 0;
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                        unsigned long long *energy) {
    nvmlReturn_t ret;
    struct delay delay = {0, 1};
    if (valid_handle(device)) wait_while_hung(device, 1);
    pthread_mutex_lock(&lock);
    ret = do_energy(device, energy);
    if (ret == NVML_SUCCESS) delay = pick_delay(device, &device->energy_latency);
    pthread_mutex_unlock(&lock);
    spend(delay);
    return ret;
}

static nvmlReturn_t do_power(nvmlDevice_t device, unsigned int *power) {
    struct fake_device *d;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    if (power == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *power = d->power_mw;
    d->calls_ok++;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    nvmlReturn_t ret;
    struct delay delay = {0, 1};
    if (valid_handle(device)) wait_while_hung(device, 0);
    pthread_mutex_lock(&lock);
    ret = do_power(device, power);
    if (ret == NVML_SUCCESS) delay = pick_delay(device, &device->power_latency);
    pthread_mutex_unlock(&lock);
    spend(delay);
    return ret;
}

static nvmlReturn_t do_fields(nvmlDevice_t device, int count, nvmlFieldValue_t *values) {
    struct fake_device *d;
    long long now_us;
    int i;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    if (count < 0 || (count > 0 && values == NULL)) return NVML_ERROR_INVALID_ARGUMENT;
    now_us = (long long)(monotonic_ns() / 1000u);
    for (i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = now_us;
        v->latencyUsec = 0;
        memset(&v->value, 0, sizeof v->value);
        if (v->fieldId == NVML_FI_DEV_POWER_INSTANT && d->has_instant) {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = NVML_SUCCESS;
            v->value.uiVal = d->instant_mw;
        } else if (v->fieldId == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION && d->counter) {
            unsigned long long energy = 0;
            d->calls_ok--; /* do_energy counts the call; this call is counted once below */
            do_energy(d, &energy);
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
            v->nvmlReturn = NVML_SUCCESS;
            v->value.ullVal = energy;
        } else {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    d->calls_ok++;
    return NVML_SUCCESS;
}

/* 1 when the request asks for the energy field (as slow as the counter itself). */
static int asks_energy(int count, const nvmlFieldValue_t *values) {
    for (int i = 0; values != NULL && i < count; i++)
        if (values[i].fieldId == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION) return 1;
    return 0;
}

EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount,
                                             nvmlFieldValue_t *values) {
    nvmlReturn_t ret;
    struct delay delay = {0, 1};
    int energy = asks_energy(valuesCount, values);
    if (valid_handle(device)) wait_while_hung(device, energy);
    pthread_mutex_lock(&lock);
    ret = do_fields(device, valuesCount, values);
    if (ret == NVML_SUCCESS)
        delay = pick_delay(device, energy ? &device->energy_latency : &device->instant_latency);
    pthread_mutex_unlock(&lock);
    spend(delay);
    return ret;
}

enum limit_kind { LIMIT_CURRENT, LIMIT_DEFAULT };

static nvmlReturn_t do_get_limit(nvmlDevice_t device, unsigned int *limit, enum limit_kind kind) {
    struct fake_device *d;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    if (limit == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *limit = kind == LIMIT_CURRENT ? d->limit_mw : d->default_limit_mw;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    LOCKED(do_get_limit(device, limit, LIMIT_CURRENT));
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                             unsigned int *limit) {
    LOCKED(do_get_limit(device, limit, LIMIT_DEFAULT));
}

static nvmlReturn_t do_constraints(nvmlDevice_t device, unsigned int *min_limit,
                                   unsigned int *max_limit) {
    struct fake_device *d;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    if (min_limit == NULL || max_limit == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *min_limit = d->min_limit_mw;
    *max_limit = d->max_limit_mw;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device,
                                                                 unsigned int *minLimit,
                                                                 unsigned int *maxLimit) {
    LOCKED(do_constraints(device, minLimit, maxLimit));
}

static nvmlReturn_t do_set_limit(nvmlDevice_t device, unsigned int limit) {
    struct fake_device *d;
    const char *log_path;
    nvmlReturn_t ret = enter_device(device, &d);
    if (ret != NVML_SUCCESS) return ret;
    if (!d->set_limit) return NVML_ERROR_NO_PERMISSION;
    if (limit < d->min_limit_mw || limit > d->max_limit_mw) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->set_fail_after >= 0 && d->sets_ok >= d->set_fail_after) return NVML_ERROR_GPU_IS_LOST;
    d->limit_mw = limit;
    d->sets_ok++;
    log_path = getenv("FAKE_NVML_LOG");
    if (log_path != NULL && *log_path != '\0') {
        FILE *log = fopen(log_path, "a");
        if (log != NULL) {
            fprintf(log, "set %u %u\n", d->index, limit);
            fclose(log);
        }
    }
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit) {
    LOCKED(do_set_limit(device, limit));
}

/* Not NVML: for tests, how many calls are blocked by hang / hang_energy right now. */
EXPORT unsigned int fakeNvmlBlockedCalls(void) {
    unsigned int n;
    pthread_mutex_lock(&lock);
    n = blocked_calls;
    pthread_mutex_unlock(&lock);
    return n;
}

/* Not NVML: for tests, how many nvmlInit calls are not yet matched by nvmlShutdown. */
EXPORT unsigned int fakeNvmlInitRefs(void) {
    unsigned int refs;
    pthread_mutex_lock(&lock);
    refs = init_refs;
    pthread_mutex_unlock(&lock);
    return refs;
}
