/* Keeps XLA:CPU's big per-step buffers mapped between steps.

XLA:CPU allocates all temporaries of one execution of a jitted function as one block
(314 MB for the demo model's train step, 6.6 GB for released tiny's) and frees it when
the execution ends. glibc's malloc serves a block that big with a fresh mmap and returns
it with munmap (XLA allocates it on a worker thread, whose arena cannot hold it), so every
step the kernel maps and zeroes the block again, one page fault per 4 KiB page.

Preloaded (LD_PRELOAD), this library serves every allocation of at least BIG_BLOCK bytes
from blocks it maps itself and keeps after free, handing a kept block to the next request
it fits; everything smaller goes straight to glibc. The free blocks it keeps add up to at
most the largest block ever freed (least recently freed ones are unmapped first), so the
memory it holds beyond what is live is one step's temporaries. pupujepa_jax/block_cache.py
builds and preloads it, and says why it is worth it (README, Speed).
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

/* glibc's own entry points, which the interposed functions below call for small blocks. */
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_calloc(size_t, size_t);

#define BIG_BLOCK ((size_t)64 << 20)
#define GRANULE ((size_t)2 << 20) /* mapping sizes round up to this: reuse across sizes */
#define PAGE ((size_t)4096)       /* largest alignment a mapping satisfies by itself */
#define MAX_BLOCKS 256

struct block {
  char *base;         /* NULL: slot unused */
  size_t length;      /* mapped bytes */
  int live;           /* handed out and not yet freed */
  uint64_t freed_at;  /* free-order stamp, for least-recently-freed eviction */
};

static struct block blocks[MAX_BLOCKS];
static int used_slots; /* slots [0, used_slots) may hold blocks; read unlocked as a hint */
static size_t kept_free_bytes, largest_freed;
static uint64_t free_clock;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* fork() while another thread holds the lock would leave the child's copy locked forever
   (Grain and multiprocessing fork from a threaded process): hold it across the fork. */
static void lock_before_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }
__attribute__((constructor)) static void register_fork_handlers(void) {
  pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
}

static size_t rounded(size_t size) { return (size + GRANULE - 1) & ~(GRANULE - 1); }

/* Unmaps least recently freed blocks until the free ones fit the budget. Lock held. */
static void trim_free_blocks(void) {
  while (kept_free_bytes > largest_freed) {
    int oldest = -1;
    for (int i = 0; i < used_slots; i++)
      if (blocks[i].base && !blocks[i].live &&
          (oldest < 0 || blocks[i].freed_at < blocks[oldest].freed_at))
        oldest = i;
    if (oldest < 0) return;
    char *base = blocks[oldest].base;
    /* Out of the table before the address goes back: a later mapping there (glibc's, say)
       must never be taken for this block by live_slot. */
    __atomic_store_n(&blocks[oldest].base, NULL, __ATOMIC_RELEASE);
    kept_free_bytes -= blocks[oldest].length;
    munmap(base, blocks[oldest].length);
  }
}

/* The first empty slot (extending the table if needed), or -1. Lock held. */
static int empty_slot(void) {
  for (int i = 0; i < used_slots; i++)
    if (!blocks[i].base) return i;
  return used_slots < MAX_BLOCKS ? used_slots : -1;
}

/* Unmaps every free block (before asking the kernel again when it refused). */
static void drop_free_blocks(void) {
  pthread_mutex_lock(&lock);
  size_t budget = largest_freed;
  largest_freed = 0;
  trim_free_blocks();
  largest_freed = budget;
  pthread_mutex_unlock(&lock);
}

static void *big_alloc(size_t size) {
  if (size > SIZE_MAX - GRANULE) {
    errno = ENOMEM;
    return NULL;
  }
  size_t length = rounded(size);
  pthread_mutex_lock(&lock);
  int best = -1; /* the smallest free block that fits without wasting over a quarter */
  for (int i = 0; i < used_slots; i++)
    if (blocks[i].base && !blocks[i].live && blocks[i].length >= length &&
        blocks[i].length <= length + length / 4 &&
        (best < 0 || blocks[i].length < blocks[best].length))
      best = i;
  if (best >= 0) {
    blocks[best].live = 1;
    kept_free_bytes -= blocks[best].length;
    pthread_mutex_unlock(&lock);
    return blocks[best].base;
  }
  pthread_mutex_unlock(&lock);
  void *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    drop_free_blocks();
    base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
      errno = ENOMEM;
      return NULL;
    }
  }
  pthread_mutex_lock(&lock);
  int slot = empty_slot();
  if (slot < 0) { /* table full: this one goes back, glibc serves the request */
    pthread_mutex_unlock(&lock);
    munmap(base, length);
    return __libc_malloc(size);
  }
  blocks[slot].length = length;
  blocks[slot].live = 1;
  __atomic_store_n(&blocks[slot].base, (char *)base, __ATOMIC_RELEASE);
  if (slot == used_slots) __atomic_store_n(&used_slots, used_slots + 1, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&lock);
  return base;
}

/* The slot of the live block of ours starting at `p`, or -1. No lock: only the freeing
   thread can change a live block's slot, and frees of glibc's blocks (nearly all of them)
   must not queue behind each other here. */
static int live_slot(void *p) {
  int n = __atomic_load_n(&used_slots, __ATOMIC_ACQUIRE);
  for (int i = 0; i < n; i++)
    if (__atomic_load_n(&blocks[i].base, __ATOMIC_ACQUIRE) == p) return i;
  return -1;
}

/* Keeps the block of `slot` for reuse, within the budget of free blocks. */
static void release(int slot) {
  pthread_mutex_lock(&lock);
  blocks[slot].live = 0;
  blocks[slot].freed_at = ++free_clock;
  kept_free_bytes += blocks[slot].length;
  if (blocks[slot].length > largest_freed) largest_freed = blocks[slot].length;
  trim_free_blocks();
  pthread_mutex_unlock(&lock);
}

void *malloc(size_t size) { return size >= BIG_BLOCK ? big_alloc(size) : __libc_malloc(size); }

void free(void *p) {
  int slot = p ? live_slot(p) : -1;
  if (slot >= 0)
    release(slot);
  else
    __libc_free(p);
}

void *calloc(size_t count, size_t size) { return __libc_calloc(count, size); }

void *realloc(void *p, size_t size) {
  int slot = p ? live_slot(p) : -1;
  if (slot < 0) return p || size < BIG_BLOCK ? __libc_realloc(p, size) : big_alloc(size);
  void *moved = malloc(size);
  if (moved) {
    size_t old = blocks[slot].length;
    memcpy(moved, p, old < size ? old : size);
    free(p);
  }
  return moved;
}

void *memalign(size_t alignment, size_t size) {
  return size >= BIG_BLOCK && alignment <= PAGE ? big_alloc(size)
                                                : __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
  void *p = memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *valloc(size_t size) { return memalign(PAGE, size); }

size_t malloc_usable_size(void *p) {
  static size_t (*glibc_usable_size)(void *);
  int slot = p ? live_slot(p) : -1;
  if (slot >= 0) return blocks[slot].length;
  if (!p) return 0;
  if (!glibc_usable_size) glibc_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
  return glibc_usable_size(p);
}
