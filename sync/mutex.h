// File: sync/mutex.h
//
// A mutex and condition variable over std::mutex / std::condition_variable, annotated
// for Clang's thread-safety analysis like absl::Mutex, for every kvx library that
// runs threads (the transport, the transceiver).
//
//   kvx::sync::Mutex mu;
//   kvx::sync::CondVar cv;
//   int count ABSL_GUARDED_BY(mu) = 0;
//   {
//     kvx::sync::MutexLock lock(&mu);
//     while (count == 0) {
//       if (cv.WaitUntil(&lock, deadline)) break;  // deadline passed
//     }
//   }
//
// Why not absl::Mutex: the Abseil in this workspace is Debian's prebuilt shared
// libraries, built without -fsanitize=thread. absl::Mutex synchronizes through atomics
// and futex calls inside those libraries, which ThreadSanitizer cannot see, so every
// access it orders is reported as a race. std::mutex goes through pthread, which TSAN
// intercepts. Swap back to absl::Mutex once Abseil is built with the sanitizers.

#ifndef KVX_SYNC_MUTEX_H_
#define KVX_SYNC_MUTEX_H_

#include <algorithm>
#include <chrono>  // NOLINT(build/c++11)
#include <condition_variable>  // NOLINT(build/c++11)
#include <mutex>  // NOLINT(build/c++11)

#include "absl/base/thread_annotations.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvx::sync {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  friend class MutexLock;
  std::mutex mu_;
};

// Holds `mu` for its scope; the handle CondVar waits on.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : lock_(mu->mu_) {}
  ~MutexLock() ABSL_UNLOCK_FUNCTION() {}
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  friend class CondVar;
  std::unique_lock<std::mutex> lock_;
};

class CondVar {
 public:
  // Waits until signalled (spurious wake-ups allowed) or `deadline` passes; returns
  // true if the deadline passed. Callers re-check their condition in a loop.
  bool WaitUntil(MutexLock* lock, absl::Time deadline) {
    const absl::Time now = absl::Now();
    if (now >= deadline) return true;
    // Bounded step: chrono cannot represent absl::InfiniteFuture().
    const absl::Duration step = std::min(deadline - now, absl::Hours(1));
    cv_.wait_for(lock->lock_, absl::ToChronoNanoseconds(step));
    return absl::Now() >= deadline;
  }

  void SignalAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

}  // namespace kvx::sync

#endif  // KVX_SYNC_MUTEX_H_
