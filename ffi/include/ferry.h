/* ferry: C ABI for live VM migration. Checked against ffi/src/lib.rs by its tests. */
#ifndef FERRY_H
#define FERRY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FERRY_ABI_VERSION 1

/* Stable status codes: never renumbered. */
typedef enum {
    FERRY_OK = 0,
    FERRY_INVALID_ARGUMENT = 1,
    FERRY_UNSUPPORTED = 2,
} ferry_status;

/* Version of this ABI. */
uint32_t ferry_abi_version(void);

/* Static description of a status code; never NULL. */
const char *ferry_status_str(int32_t status);

/* FERRY_OK when the kernel supports ferry's dirty tracking (userfaultfd WP_ASYNC + PAGEMAP_SCAN). */
ferry_status ferry_dirty_tracking_supported(void);

/* Parses "256M", "16GiB", "200MB/s" into bytes. */
ferry_status ferry_parse_size(const char *text, uint64_t *out_bytes);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_H */
