// Do not include directly. Internal to //transport/libfabric.
// IWYU pragma: private
//
// The libfabric objects behind one LibfabricTransport, one file per concern:
//   fabric_info.cc          choosing the provider (fi_getinfo) and explaining refusals
//   fabric_endpoint.cc      fabric, domain, completion queue, address vector, endpoint
//   memory_registration.cc  fi_mr_reg under the mr_mode the provider asked for
//   progress.cc             posting writes and reading the completion queue
//   fabric_error.cc         libfabric return codes as absl::Status
//
// Thread safety: the domain is opened FI_THREAD_SAFE, so registration and peer
// insertion (caller threads) may run beside posting and progress (the owner thread).
// PostWrite, Poll, Revoke, RemovePeer and ResetPeer are called from the owner thread
// only (Revoke also for a grant that was never given out).

#ifndef KVX_TRANSPORT_LIBFABRIC_INTERNAL_FABRIC_ENDPOINT_H_
#define KVX_TRANSPORT_LIBFABRIC_INTERNAL_FABRIC_ENDPOINT_H_

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "transport/internal/mutex.h"
#include "transport/internal/write_engine.h"
#include "transport/transport.h"

namespace kvx::libfabric_internal {

// `what` failed with libfabric return code `ret` (negative): the message carries
// ret and fi_strerror(-ret); the code follows what the caller should do next
// (connection errors are Unavailable, a refused key PermissionDenied, ...).
absl::Status FabricError(absl::string_view what, int ret);

struct InfoDeleter {
  void operator()(fi_info* info) const { fi_freeinfo(info); }
};
using InfoPtr = std::unique_ptr<fi_info, InfoDeleter>;

// Providers tried, best first, when none is named.
inline constexpr const char* kAutoProviders[] = {"efa", "verbs;ofi_rxm", "tcp;ofi_rxm", "shm"};

// Finds `provider` ("tcp;ofi_rxm", ...) offering FI_EP_RDM with FI_RMA writes,
// FI_THREAD_SAFE and an mr_mode we handle, bound to `node` if not empty.
// Errors: `Unavailable` the provider is not present or cannot bind `node`;
// `FailedPrecondition` it is present but lacks a capability we need (the message
// names it). Never falls back to another provider.
absl::StatusOr<InfoPtr> FindProvider(const std::string& provider, const std::string& node);

class FabricEndpoint {
 public:
  // Opens fabric, domain, CQ (at least `cq_size` entries), AV and endpoint on `info`.
  static absl::StatusOr<std::unique_ptr<FabricEndpoint>> Open(InfoPtr info, int64_t cq_size);
  ~FabricEndpoint();
  FabricEndpoint(const FabricEndpoint&) = delete;
  FabricEndpoint& operator=(const FabricEndpoint&) = delete;

  const fi_info& info() const { return *info_; }
  // The provider's raw endpoint address (fi_getname).
  const std::string& raw_name() const { return raw_name_; }

  // Checks a peer's raw address against the provider's address format (length,
  // family, terminator) and inserts it into the address vector. Errors:
  // `InvalidArgument` malformed; the provider's error otherwise.
  absl::StatusOr<transport_internal::BackendPeer> InsertPeer(absl::string_view raw_name);
  // Removes the peer from the address vector; with FI_AV_REMOVE_CLEANUP (set by
  // CreateLibfabricTransport) rxm closes its connection, which fails what is in
  // flight on it (FI_ECANCELED) and drops what is arriving.
  // Not on shm (CanDropConnections): there the fence is the key revocation alone.
  void RemovePeer(uint64_t handle);
  // RemovePeer, then inserts the same address again: a fresh connection on demand.
  absl::StatusOr<uint64_t> ResetPeer(const transport_internal::BackendPeer& peer);

  // memory_registration.cc
  // Registers memory for local access only (the source of writes): no key of it is
  // ever accepted for a remote write.
  absl::StatusOr<transport_internal::BackendRegion> Register(void* base, uint64_t length,
                                                             transport::MemoryKind kind);
  void Deregister(const transport_internal::BackendRegion& region);
  // Registers [base, base + length) again, for remote writes under a fresh random key
  // (or the provider's key under FI_MR_PROV_KEY), for one peer.
  absl::StatusOr<transport_internal::BackendGrant> Grant(
      const transport_internal::BackendRegion& region, char* base, uint64_t length);
  void Revoke(const transport_internal::BackendGrant& grant);

  // progress.cc. PostWrite returns false when the provider's queue is full
  // (-FI_EAGAIN; also while tcp connects on demand).
  absl::StatusOr<bool> PostWrite(const transport_internal::PostedWrite& write, void* context);
  void Poll(std::vector<transport_internal::Completion>* completions);

 private:
  bool CanDropConnections() const;
  // fi_mr_reg (or fi_mr_regattr for device memory) under a random key, retried while
  // the key is taken; binds to the endpoint under FI_MR_ENDPOINT.
  absl::StatusOr<fid_mr*> RegisterMr(void* base, uint64_t length, transport::MemoryKind kind,
                                     uint64_t access);

  explicit FabricEndpoint(InfoPtr info) : info_(std::move(info)) {}

  InfoPtr info_;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  fid_cq* cq_ = nullptr;
  fid_av* av_ = nullptr;
  fid_ep* ep_ = nullptr;
  std::string raw_name_;
  transport_internal::Mutex mrs_mu_;
  // Regions still registered, closed before the domain when the endpoint closes.
  absl::flat_hash_set<fid_mr*> mrs_ ABSL_GUARDED_BY(mrs_mu_);
};

}  // namespace kvx::libfabric_internal

#endif  // KVX_TRANSPORT_LIBFABRIC_INTERNAL_FABRIC_ENDPOINT_H_
