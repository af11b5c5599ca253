/*
 * CRC-32C (Castagnoli), for the queues' optional payload checksums.
 *
 * The processor's own instruction where there is one (SSE 4.2 on x86-64, the
 * CRC extension on aarch64), chosen at run time; elsewhere a table-driven
 * version (slice-by-8).  All give the same values: crc32c(b"123456789") is
 * 0xE3069283.
 */
#include "native.h"

#include <string.h>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif

static uint32_t table[8][256];
static uint32_t (*kernel)(uint32_t, const unsigned char *, size_t);

static uint32_t
crc_tables(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;   /* little-endian: the low four bytes carry the crc */
        crc = table[7][v & 0xFF] ^ table[6][(v >> 8) & 0xFF] ^ table[5][(v >> 16) & 0xFF] ^
              table[4][(v >> 24) & 0xFF] ^ table[3][(v >> 32) & 0xFF] ^
              table[2][(v >> 40) & 0xFF] ^ table[1][(v >> 48) & 0xFF] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t
crc_instruction(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#elif defined(__aarch64__) && defined(__linux__)
__attribute__((target("+crc"))) static uint32_t
crc_instruction(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        crc = __builtin_aarch64_crc32cb(crc, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = __builtin_aarch64_crc32cx(crc, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = __builtin_aarch64_crc32cb(crc, *p++);
    return crc;
}
#endif

void
shmcast_crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
    kernel = crc_tables;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2"))
        kernel = crc_instruction;
#elif defined(__aarch64__) && defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_CRC32)
        kernel = crc_instruction;
#endif
}

uint32_t
shmcast_crc32c(uint32_t crc, const void *data, size_t n)
{
    return ~kernel(~crc, (const unsigned char *)data, n);
}

int
shmcast_crc32c_hardware(void)
{
    return kernel != crc_tables;
}

/* crc32c(data, value=0, portable=False) -> int: CRC-32C of a buffer, continuing from
 * `value`; `portable` uses the tables even where the processor has an instruction (for
 * tests: both must agree). */
PyObject *
shmcast_crc32c_py(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "value", "portable", NULL};
    Py_buffer view;
    unsigned int value = 0;
    int portable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|Ip:crc32c", kwlist, &view, &value,
                                     &portable))
        return NULL;
    uint32_t (*run)(uint32_t, const unsigned char *, size_t) = portable ? crc_tables : kernel;
    uint32_t crc;
    if (view.len >= 256 * 1024) {
        Py_BEGIN_ALLOW_THREADS
        crc = ~run(~value, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        crc = ~run(~value, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}
