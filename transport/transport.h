// File: transport/transport.h
//
// The transport interface: registered memory, a local endpoint with a serializable
// address, peers, remote write access granted per peer, and batches of remote writes
// tracked as one transfer with a deadline. It moves bytes and knows nothing of KV
// caches (DESIGN.md). Backends live in `transport/<backend>/` (`//transport/loopback`,
// `//transport/libfabric`) and return a `std::unique_ptr<Transport>`.
//
// Vocabulary: the *initiator* posts writes, the *target* owns the memory they land in.
// Every endpoint can be both.
//
//   // Target: register a buffer, learn the initiator, let it (and only it) write.
//   absl::StatusOr<kvx::transport::RegionId> dst = target->RegisterMemory(buf, n);
//   absl::StatusOr<kvx::transport::PeerId> writer = target->AddPeer(initiator_address);
//   absl::StatusOr<kvx::transport::RegionDescriptor> grant =
//       target->GrantRemoteWrite(*dst, *writer);
//   // ... the control plane carries target->address() and *grant to the initiator ...
//
//   // Initiator: add the target, write, wait.
//   absl::StatusOr<kvx::transport::PeerId> peer = initiator->AddPeer(target_address);
//   kvx::transport::WriteOp op{*src, 0, *grant, 0, n};
//   absl::StatusOr<kvx::transport::TransferId> t =
//       initiator->PostWrites(*peer, {op}, absl::Now() + absl::Seconds(5));
//   absl::Status done = kvx::transport::AwaitTransfer(*initiator, *t, absl::InfiniteFuture());
//   // OK: the bytes are visible at the target, a notification sent now can be trusted.
//
// (transport/transport_example_test.cc compiles and runs this example.)
//
// Semantics every backend honours; the conformance suite
// (`transport/transport_conformance_test.h`) checks each of them on every backend:
//   1. Delivery. A transfer is kDone only when every byte of every write is visible in
//      the target's memory (a delivery-complete write behind all the others).
//   2. Failure is reported at once. A write error, the deadline, CancelTransfer or
//      RemovePeer moves the transfer to kFailed with its error as soon as it happens;
//      writes of it that were not posted yet are dropped.
//   3. Quiescence comes within a bounded time. A failed transfer then reaches kQuiesced
//      once none of its writes is queued or in flight here any more: all ended at the
//      provider, or, after `quiesce_timeout`, the connection to the peer was reset
//      (which fails every other transfer to that peer too). From kQuiesced on, the
//      transport never reads the transfer's source memory again and its local regions
//      can be deregistered. `target_settled` says whether nothing of it can land at
//      the target any more either (see TransferStatus).
//   4. Bounds. Writes are checked against both regions before anything is queued
//      (`OutOfRange`); the target refuses a key it did not grant, a key granted to
//      another peer (where the backend can tell), and a range outside the granted
//      region.
//   5. Fence. When RemovePeer(p) returns, no byte of any write that p issued can land
//      in this endpoint's memory any more, on every backend: p's grants are revoked and
//      its connection is torn down. p may be added again later (a new id, new grants);
//      p's first writes after the fence may still fail `Unavailable` until its provider
//      has seen the connection close, then p connects afresh: a write that fails
//      because its connection broke resets that connection at once (failing the
//      other transfers in flight on it, `Unavailable`), so the next one reconnects.
//   6. Deregistration. A region cannot be deregistered while a transfer that reads it
//      is not final, or while a peer holds a grant on it (`FailedPrecondition`): the
//      rule "remove every peer that may write a region before freeing it" is enforced,
//      because no provider can stop a write that is already arriving.
//   7. Isolation. Each peer has its own queue and window of writes in flight: a stuck,
//      slow or dead peer delays only the transfers to that peer.
//   8. One fault, one code, on every backend:
//        unknown peer or region            NotFound (at PostWrites)
//        range past a region or descriptor OutOfRange (at PostWrites)
//        queue bound reached               ResourceExhausted (at PostWrites)
//        target refused or dropped the     Unavailable (the transfer's error): a wrong
//          write, or is unreachable          or revoked key, a forged length, a target
//                                            that fenced us, died or never answered
//        deadline passed mid-transfer      DeadlineExceeded
//        CancelTransfer / RemovePeer       Aborted
//      (A network target cannot tell the initiator *why* it refused a write, so a
//      wrong key is Unavailable on loopback too.)
//   9. Threads. Each endpoint has one owner thread that posts and progresses; the
//      methods below hand work to it and may be called from any thread.
//
// What protects a target's memory, per backend: README.md beside this file.
//
// Thread safety: all methods of `Transport` are thread-safe.

#ifndef KVX_TRANSPORT_TRANSPORT_H_
#define KVX_TRANSPORT_TRANSPORT_H_

#include <cstdint>
#include <functional>
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

// What one peer needs to write into a region of ours: returned by GrantRemoteWrite
// and carried to that peer by the control plane. `address` is the value the backend
// expects for byte 0 of the region (a virtual address under FI_MR_VIRT_ADDR, else 0:
// offset addressing); writes add their `remote_offset` to it. `key` is random (64
// bits) on every backend that lets kvx choose it.
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

// Serializes `descriptor` for a peer.
std::string EncodeRegionDescriptor(const RegionDescriptor& descriptor);

// Parses bytes from EncodeRegionDescriptor. Untrusted input is safe: returns
// `InvalidArgument` for a wrong size, magic or version; never crashes.
ABSL_MUST_USE_RESULT absl::StatusOr<RegionDescriptor> DecodeRegionDescriptor(
    absl::string_view bytes);

using RegionId = int64_t;
using PeerId = int64_t;
using TransferId = int64_t;

// One remote write: `length` bytes from local region `local_region` at `local_offset`
// to the remote region `remote` at `remote_offset`. Writes longer than the backend's
// maximum message size are split; a zero length is refused (`InvalidArgument`).
struct WriteOp {
  RegionId local_region = 0;
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
  int64_t peer_window = 0;      // Writes in flight to one peer at most.
  int64_t max_in_flight = 0;    // Writes in flight on the endpoint at most.
};

// The life of a transfer:
//
//   kInProgress --> kDone                   (final: every byte is at the target)
//        |
//        +--------> kFailed --> kQuiesced   (final: nothing of it is in flight here)
// Knobs every backend's endpoint shares.
struct EndpointOptions {
  // Affect behavior.
  // How long a failed transfer's writes may stay in flight before the connection to
  // its peer is reset (semantics 3).
  absl::Duration quiesce_timeout = absl::Seconds(1);
  // How long RemovePeer waits for the owner thread to confirm the fence.
  absl::Duration fence_timeout = absl::Seconds(10);
  // Bounds on what PostWrites may queue and AddPeer may add (ResourceExhausted past
  // them): transfers tracked and not yet returned final, writes of non-final
  // transfers, peers.
  int64_t max_transfers = int64_t{1} << 20;
  int64_t max_queued_writes = int64_t{1} << 24;
  int64_t max_peers = 4096;

  // Affect performance.
  // Writes longer than this are split; 0 means the backend's maximum (1 GiB at most).
  uint64_t max_write_bytes = 0;
  // Pieces in flight to one peer at most, and on the whole endpoint at most (0: the
  // backend's queue size).
  int64_t peer_window = 64;
  int64_t max_in_flight = 0;
  // How long the owner thread sleeps between polls once nothing has happened for a
  // moment; zero always spins (one core per endpoint). Providers with manual progress
  // (tcp, shm) progress incoming writes only when the target polls, so this also
  // throttles an idle target.
  absl::Duration idle_poll_interval = absl::Microseconds(50);

  // Called on the owner thread, with no lock held, after one or more transfers
  // changed state (kDone, kFailed, kQuiesced), so a caller can wake up and poll
  // instead of polling on a timer. Must be cheap and must not call back into this
  // transport.
  std::function<void()> on_transfer_update;
};

enum class TransferState {
  kInProgress,  // Writes are queued or in flight.
  kDone,        // Final. Every byte is visible at the target.
  kFailed,      // Failed (`error`); some of its writes may still be in flight.
  kQuiesced,    // Final. Failed, and none of its writes is queued or in flight here.
};

struct TransferStatus {
  TransferState state = TransferState::kInProgress;
  // The failure, in kFailed and kQuiesced (the codes of semantics 8); OK otherwise.
  absl::Status error;
  // kQuiesced only. True when nothing of the transfer can land at the target any
  // more: every write it posted ended and a delivery-complete write behind them
  // completed, or it posted nothing, or its connection broke under it (the target
  // closed it: its fence, or it died; nothing sent on it lands any more, and a
  // failed transfer never continues on another connection). False when the
  // transport gave up waiting and reset the connection, or the peer was removed: a
  // target that is still alive may then yet receive bytes the provider had handed
  // to the network, until it fences this endpoint (RemovePeer). A receiver must not
  // reuse the pages of an unsettled transfer before it has fenced the sender.
  bool target_settled = false;

  bool final() const {
    return state == TransferState::kDone || state == TransferState::kQuiesced;
  }
};

class Transport {
 public:
  virtual ~Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  virtual Capabilities capabilities() const = 0;

  // The serialized address of this endpoint, for a peer's AddPeer. Opaque bytes,
  // versioned by the backend.
  virtual std::string address() const = 0;

  // Registers `length` bytes at `base` as the source of local writes. Peers can
  // write into it only once granted (GrantRemoteWrite).
  // REQUIRES: the memory outlives the registration (until DeregisterMemory returns OK
  // or the transport is destroyed).
  // Errors: `InvalidArgument` null base or zero length; `Unimplemented` a memory kind
  // the backend lacks; the backend's error otherwise.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<RegionId> RegisterMemory(
      void* base, uint64_t length, MemoryKind kind = MemoryKind::kHost) = 0;

  // Deregisters a region. Errors: `NotFound` unknown id; `FailedPrecondition` while a
  // transfer that reads it has not reached a final state, or while a peer holds a
  // grant on it (RemovePeer that peer first; semantics 6).
  ABSL_MUST_USE_RESULT virtual absl::Status DeregisterMemory(RegionId region) = 0;

  // Adds a peer from its `address()`. The address is checked for length and format
  // before the backend sees it. Adding an address that is already known returns the
  // same id. Errors: `InvalidArgument` malformed or foreign address; `Unavailable`
  // the backend cannot reach it; `ResourceExhausted` too many peers.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<PeerId> AddPeer(absl::string_view address) = 0;

  // The fence (semantics 5): revokes every grant `peer` holds, tears down the
  // connection to it, and fails every transfer to it that is not final (`Aborted`).
  // When it returns OK, no byte of any write that `peer` issued can land in this
  // endpoint's memory any more. Its address may be added again (a new id).
  // Errors: `NotFound` unknown peer; `DeadlineExceeded` the owner thread did not
  // confirm within EndpointOptions::fence_timeout (nothing is guaranteed then).
  ABSL_MUST_USE_RESULT virtual absl::Status RemovePeer(PeerId peer) = 0;

  // Lets `peer` write into `region` and returns the descriptor to send it. The key is
  // fresh and random; calling again for the same pair returns the same descriptor.
  // Errors: `NotFound` unknown region or peer; the backend's error otherwise.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<RegionDescriptor> GrantRemoteWrite(
      RegionId region, PeerId peer) = 0;

  // Queues `writes` to `peer` as one transfer that must end by `deadline`. Validates
  // everything first and queues nothing on error: `NotFound` unknown peer or local
  // region; `OutOfRange` a range past the end of its local region or its remote
  // descriptor; `InvalidArgument` an empty batch or a zero-length write;
  // `ResourceExhausted` the endpoint's bound on tracked transfers or queued writes is
  // reached (the message names it); `FailedPrecondition` the transport is shutting
  // down.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<TransferId> PostWrites(
      PeerId peer, absl::Span<const WriteOp> writes, absl::Time deadline) = 0;

  // Fails the transfer with `Aborted` at once, unless it already ended (then its
  // outcome stands and this is a no-op). Writes not yet posted are dropped; writes in
  // flight are never interrupted: wait for kQuiesced before reusing the source.
  // Errors: `NotFound` unknown id.
  ABSL_MUST_USE_RESULT virtual absl::Status CancelTransfer(TransferId id) = 0;

  // Returns the transfer's status without blocking. Once a final state (kDone,
  // kQuiesced) has been returned the id is forgotten and later calls return
  // `NotFound`.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<TransferStatus> PollTransfer(TransferId id) = 0;

  // Blocks until the transfer reaches a final state (and forgets it, as PollTransfer)
  // or `wait_deadline` passes: then `DeadlineExceeded` naming the wait, with the
  // transfer still tracked.
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<TransferStatus> WaitTransfer(
      TransferId id, absl::Time wait_deadline) = 0;

 protected:
  Transport() = default;
};

// WaitTransfer, folded into one status: OK when the transfer is kDone, its error once
// it has quiesced, or the wait's `DeadlineExceeded`.
ABSL_MUST_USE_RESULT absl::Status AwaitTransfer(Transport& transport, TransferId id,
                                                absl::Time wait_deadline);

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_TRANSPORT_H_
