// Do not include directly. Internal to //transport and its backends.
// IWYU pragma: private
//
// The transport's names for the TSAN-visible mutex of sync/mutex.h.

#ifndef KVX_TRANSPORT_INTERNAL_MUTEX_H_
#define KVX_TRANSPORT_INTERNAL_MUTEX_H_

#include "sync/mutex.h"

namespace kvx::transport_internal {

using sync::CondVar;
using sync::Mutex;
using sync::MutexLock;

}  // namespace kvx::transport_internal

#endif  // KVX_TRANSPORT_INTERNAL_MUTEX_H_
