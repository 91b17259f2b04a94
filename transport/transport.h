// File: transport/transport.h
//
// The transport interface: registered memory, a local endpoint with a serializable
// address, peers, and batches of remote writes tracked as one transfer with a
// deadline. It moves bytes and knows nothing of KV caches (DESIGN.md). Backends live in
// `transport/<backend>/` (`//transport/loopback`, `//transport/libfabric`) and return a
// `std::unique_ptr<Transport>`.
//
//   // Target side: register a buffer and advertise it.
//   ASSIGN_OR_RETURN(kvx::transport::LocalRegion dst, target->RegisterMemory(buf, n));
//   std::string advert = target->address() + EncodeRegionDescriptor(dst.descriptor);
//   // Initiator side: add the peer, write, wait.
//   ASSIGN_OR_RETURN(kvx::transport::PeerId peer, initiator->AddPeer(target_address));
//   kvx::transport::WriteOp op{src.id, 0, remote_descriptor, 0, n};
//   ASSIGN_OR_RETURN(kvx::transport::TransferId t,
//                    initiator->PostWrites(peer, {op}, absl::Now() + absl::Seconds(5)));
//   RETURN_IF_ERROR(initiator->WaitTransfer(t, absl::InfiniteFuture()));
//   // The bytes are now visible at the target: a notification sent now can be trusted.
//
// Semantics every backend honours (the conformance suite in
// `transport/transport_conformance_test.h` checks them):
//   1. A transfer is complete only when every byte of every write is visible in the
//      target's memory (delivery complete, or an explicit flush where needed).
//   2. A transfer fails if any of its writes fails; the message names the peer, the
//      write index and the backend's (provider's) error string. A failed transfer is
//      reported only once none of its writes is still in flight at the provider, except
//      when its deadline passes, which fails it at once.
//   3. Every transfer ends (completes or fails) by its deadline; none hangs.
//   4. Writes are bounds-checked locally against both regions before posting
//      (`OutOfRange`); the target refuses a wrong key or a range outside its region.
//   5. A region cannot be deregistered while a write that uses it is queued or in
//      flight (`FailedPrecondition`); memory is never used after deregistration.
//   6. Each endpoint has one owner thread that posts and progresses; the methods below
//      hand work to it and may be called from any thread.
//
// Thread safety: all methods of `Transport` are thread-safe.

#ifndef KVX_TRANSPORT_TRANSPORT_H_
#define KVX_TRANSPORT_TRANSPORT_H_

#include <cstdint>
#include <string>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace kvx::transport {

// Where a registered region lives.
enum class MemoryKind : uint8_t {
  kHost = 0,
  kCuda = 1,  // Registered through FI_HMEM where the provider and CUDA allow.
};

// What a peer needs to write into a registered region. `address` is the value the
// backend expects for byte 0 of the region (a virtual address under FI_MR_VIRT_ADDR,
// else 0: offset addressing); writes add their `remote_offset` to it.
struct RegionDescriptor {
  uint64_t address = 0;
  uint64_t length = 0;
  uint64_t key = 0;

  friend bool operator==(const RegionDescriptor& a, const RegionDescriptor& b) {
    return a.address == b.address && a.length == b.length && a.key == b.key;
  }
};

// Wire format of a RegionDescriptor, little-endian, 29 bytes:
//   magic "KVXR" (4) | version (1) | address (8) | length (8) | key (8).
// Version history: 1 is the first.
inline constexpr uint8_t kRegionDescriptorVersion = 1;
inline constexpr size_t kEncodedRegionDescriptorBytes = 29;

// Serializes `descriptor` for a rank's advertisement.
std::string EncodeRegionDescriptor(const RegionDescriptor& descriptor);

// Parses bytes from EncodeRegionDescriptor. Untrusted input is safe: returns
// `InvalidArgument` for a wrong size, magic or version; never crashes.
ABSL_MUST_USE_RESULT absl::StatusOr<RegionDescriptor> DecodeRegionDescriptor(
    absl::string_view bytes);

// A region registered with this endpoint. `id` names it in local WriteOps and in
// DeregisterMemory; `descriptor` is what peers need.
struct LocalRegion {
  int64_t id = 0;
  RegionDescriptor descriptor;
};

using PeerId = int64_t;
using TransferId = int64_t;

// One remote write: `length` bytes from local region `local_region` at `local_offset`
// to the remote region `remote` at `remote_offset`. Writes longer than the backend's
// maximum message size are split; a zero length is refused (`InvalidArgument`).
struct WriteOp {
  int64_t local_region = 0;
  uint64_t local_offset = 0;
  RegionDescriptor remote;
  uint64_t remote_offset = 0;
  uint64_t length = 0;
};

// What a backend offers. Queried before use; unsupported operations return
// `Unimplemented`.
struct Capabilities {
  std::string backend;          // "loopback", or the libfabric provider name.
  bool host_memory = true;      // RegisterMemory(kHost) works.
  bool cuda_memory = false;     // RegisterMemory(kCuda) works.
  uint64_t max_write_bytes = 0; // Larger writes are split into pieces of this size.
  int64_t max_outstanding_writes = 0;  // The window of writes in flight.
};

enum class TransferState { kInProgress, kDone };

class Transport {
 public:
  virtual ~Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  virtual Capabilities capabilities() const = 0;

  // The serialized address of this endpoint, for a peer's AddPeer. Opaque bytes,
  // versioned by the backend.
  virtual std::string address() const = 0;

  // Registers `length` bytes at `base` for local and remote writes.
  // REQUIRES: the memory outlives the registration (until DeregisterMemory returns OK
  // or the transport is destroyed).
  // Errors: `InvalidArgument` null base or zero length; `Unimplemented` a memory kind
  // the backend lacks; the backend's error otherwise.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<LocalRegion> RegisterMemory(
      void* base, uint64_t length, MemoryKind kind = MemoryKind::kHost) = 0;

  // Deregisters a region. Errors: `NotFound` unknown id; `FailedPrecondition` while a
  // write that uses the region (locally or as the target of a loopback write) is
  // queued or in flight: wait for its transfer and retry.
  ABSL_MUST_USE_RESULT virtual absl::Status DeregisterMemory(int64_t region_id) = 0;

  // Adds a peer from its `address()`. Errors: `InvalidArgument` malformed address;
  // `Unavailable` the backend cannot reach it.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<PeerId> AddPeer(absl::string_view address) = 0;

  // Queues `writes` to `peer` as one transfer that must end by `deadline`. Validates
  // everything first and queues nothing on error: `NotFound` unknown peer or local
  // region; `OutOfRange` a range past the end of its local region or its remote
  // descriptor; `InvalidArgument` an empty batch or a zero-length write;
  // `FailedPrecondition` the transport is shutting down.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<TransferId> PostWrites(
      PeerId peer, absl::Span<const WriteOp> writes, absl::Time deadline) = 0;

  // Returns kInProgress, kDone, or the transfer's error (`DeadlineExceeded` when its
  // deadline passed). Once kDone or an error is returned the id is forgotten and
  // later calls return `NotFound`.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<TransferState> PollTransfer(TransferId id) = 0;

  // Blocks until the transfer ends or `wait_deadline` passes. Returns OK when done or
  // the transfer's error (and forgets the id, as PollTransfer), or
  // `DeadlineExceeded` naming the wait, with the transfer still tracked, when
  // `wait_deadline` passes first.
  ABSL_MUST_USE_RESULT virtual absl::Status WaitTransfer(TransferId id,
                                                         absl::Time wait_deadline) = 0;

 protected:
  Transport() = default;
};

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_TRANSPORT_H_
