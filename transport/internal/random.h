// Do not include directly. Internal to //transport and its backends.
// IWYU pragma: private
//
// Random 64-bit values from the kernel's CSPRNG, for memory keys: a key is the only
// thing that keeps a stranger that knows an endpoint's address from writing into its
// memory, so it must not be guessable (no counter, no seeded PRNG).

#ifndef KVX_TRANSPORT_INTERNAL_RANDOM_H_
#define KVX_TRANSPORT_INTERNAL_RANDOM_H_

#include <sys/random.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace kvx::transport_internal {

inline uint64_t RandomKey() {
  uint64_t value = 0;
  char* out = reinterpret_cast<char*>(&value);
  size_t got = 0;
  while (got < sizeof(value)) {
    const ssize_t n = getrandom(out + got, sizeof(value) - got, 0);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      // getrandom only fails on kernels older than 3.17; no key is better than a
      // guessable one.
      std::fprintf(stderr, "kvx transport: getrandom failed, cannot make a memory key\n");
      std::abort();
    }
  }
  return value;
}

}  // namespace kvx::transport_internal

#endif  // KVX_TRANSPORT_INTERNAL_RANDOM_H_
