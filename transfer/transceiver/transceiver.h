// File: transfer/transceiver/transceiver.h
//
// The object an inference engine calls to move the KV cache of its requests from a
// context (prefill) instance to a generation (decode) instance. One Transceiver per
// rank: it owns the rank's transport endpoint and control-plane channel, ties the
// rank's KV pools to registered memory, talks to the ranks of peer instances, and
// for each request builds the slices through the engine's cache manager, exchanges
// request data, pairs blocks, plans and posts the writes of every overlapping
// (context rank, generation rank) pair, and reports.
//
// Vocabulary: context/generation here; sender/receiver in transfer/session.h;
// src/dst in plans; initiator/target in the transport (README.md, "Vocabulary").
//
// An engine integrates in three steps (README.md, "Integrating an engine", has the
// whole example):
//
//   // 1. Once per rank: describe the KV pools, plug in the cache manager.
//   kvx::transceiver::RankSetup setup;
//   setup.page_table = my_page_table;             // pools at their real addresses
//   setup.adapter = &my_v2_adapter;               // cache_reuse::V2Adapter
//   setup.create_transport = [](const kvx::transport::EndpointOptions& endpoint) {
//     kvx::transport::LibfabricOptions fabric;  // provider, node, ...
//     fabric.endpoint = endpoint;
//     return kvx::transport::CreateLibfabricTransport(fabric);
//   };
//   kvx::transceiver::TransceiverOptions options;
//   options.instance = "decode-0";
//   options.role = kvx::transfer::Role::kGeneration;
//   auto rank = kvx::transceiver::Transceiver::Create(options, std::move(setup));
//   // 2. Once per peer instance: the eager handshake.
//   absl::Status added = (*rank)->AddPeerInstance(prefill_addresses, deadline);
//   // 3. Per request.
//   kvx::transceiver::GenerationRequest request;
//   request.unique_rid = 17; request.prompt_len = 4096;
//   request.context_instance = "prefill-0";
//   absl::Status started = (*rank)->RequestAndReceiveAsync(request);
//   for (const kvx::transceiver::RequestStatus& done :
//        (*rank)->CheckGenTransferStatus(/*at_least=*/0, absl::InfinitePast())) {
//     // done.state: kFullyTransferred, kError (DeadlineExceeded: a timeout), or
//     // kCancelled; in every case the request's pages may now be released.
//   }
//
// Guarantees (SEMANTICS.md section 7):
//   1. A request reported final (kFullyTransferred, kError, kCancelled) has nothing
//      in flight: the engine may free or reuse its pages. On the generation side a
//      failed request is final only once every sender reported settled or was
//      fenced (transport RemovePeer), so no late byte can land in reused pages.
//   2. kFullyTransferred on the generation side means every byte of the request and
//      its auxiliary tokens arrived; the received blocks were committed for reuse
//      (CacheReuseAdapter::CommitReceivedBlocks) when the engine collected it.
//   3. Every request ends: a lost, slow or failed peer ends it in kError
//      (DeadlineExceeded after its timeout, the peer's error otherwise) on both
//      sides, never a hang.
//   4. Exactly once: each (slice, overlapping rank pair) is planned and posted at
//      most once whichever of the engine's call and the peer's request data comes
//      first; duplicated, reordered or late messages change nothing; a cancel that
//      arrives before the request is remembered for `cancel_memory`.
//   5. One source of truth: tokens per block, windows, head counts and MLA come from
//      the page tables, checked compatible at the handshake; a request or message
//      that contradicts them fails that request (InvalidArgument), never the rank.
//   6. Untrusted peers: every message is decoded strictly; block ids are checked
//      against the pools the peer's own page table declared; writes go only to
//      grants the receiving rank gave this rank, and a bad message fails one
//      request, never the process.
//
// Thread safety: all methods are thread-safe. One internal thread per rank runs
// the control plane and the sessions; BuildSlice and CommitReceivedBlocks call the
// cache manager on the engine's thread (the one calling RespondAndSendAsync,
// RequestAndReceiveAsync and Check*TransferStatus).

#ifndef KVX_TRANSFER_TRANSCEIVER_TRANSCEIVER_H_
#define KVX_TRANSFER_TRANSCEIVER_TRANSCEIVER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cache_reuse/adapter.h"
#include "transfer/control_security.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/session.h"
#include "transfer/slice.h"
#include "transport/transport.h"

namespace kvx::transceiver {

using transfer::Role;
using transfer::SessionState;

struct TransceiverOptions {
  // Affect behavior.
  std::string instance;  // This instance's name: 1..256 printable bytes.
  Role role = Role::kContext;
  // The control plane's ZeroMQ endpoint (port 0: any free one).
  std::string control_bind = "tcp://127.0.0.1:0";
  // Who may talk to the control plane: off (default), or CURVE with this
  // instance's keys and the allowlist of peer instances (transfer/CONTROL_PLANE.md;
  // LoadCurveSecurity in transfer/curve_key_files.h reads a key directory). With
  // CURVE a peer rank is accepted only under the instance name its key is tied to,
  // and AddPeerInstance must name the instance it adds.
  transfer::ControlSecurity control_security;
  // A request that names no timeout ends in kError (DeadlineExceeded) after this.
  absl::Duration default_request_timeout = absl::Seconds(60);
  // After a generation-side failure, how long senders get to report before they
  // are fenced (their connection cut, every other request with them failed).
  absl::Duration report_grace = absl::Seconds(2);
  // How long a cancel for a request this rank does not know yet is remembered, and
  // how long request data waits for the engine's task before it is answered FAILED.
  absl::Duration cancel_memory = absl::Seconds(60);
  absl::Duration request_data_ttl = absl::Seconds(60);
  // Requests tracked at once (ResourceExhausted past it).
  size_t max_requests = 65536;

  // Affect performance.
  // Staging mode (gather, one write, scatter) for a (slice, rank pair) whose
  // planned writes are small: when their average size is below `threshold_bytes`,
  // the sender gathers them into a staging slot, writes the slot in one write, and
  // the receiver scatters it. 0 turns staging off (unless `only`).
  struct Staging {
    uint64_t threshold_bytes = 16 << 10;
    // Per peer rank, on each side: slots of slot_bytes. A sender waits for a free
    // slot (the receiver's credit) and never overwrites one not yet scattered.
    uint32_t slots = 4;
    uint64_t slot_bytes = uint64_t{4} << 20;
    // A sender refuses a peer's staging offer larger than this (it allocates as much).
    uint64_t max_arena_bytes = uint64_t{64} << 20;
    // Never let peers write the pools directly: the pools are not registered with
    // the transport, and every pair is staged. Chosen by itself (and said in the
    // log) for CUDA pools the transport cannot register (no FI_HMEM / GPUDirect
    // RDMA, as Debian's libfabric): staging then goes through pinned host memory,
    // gathered and scattered by the CUDA kernels, each chunk's copy overlapping the
    // previous chunk's write.
    bool only = false;
  };
  Staging staging;
};

// Creates a rank's transport endpoint from `options`.
using TransportFactory = std::function<absl::StatusOr<std::unique_ptr<transport::Transport>>(
    const transport::EndpointOptions& options)>;

// One rank's memory, cache manager and transport. Moved into Create.
struct RankSetup {
  // Pools at their addresses in this process; every pool is registered with the
  // transport (pools and regions are tied here, by index). Validated.
  transfer::RankPageTable page_table;
  transport::MemoryKind pool_memory = transport::MemoryKind::kHost;
  // The engine's cache manager. Not owned; must outlive the Transceiver.
  cache_reuse::CacheReuseAdapter* adapter = nullptr;
  // Creates this rank's endpoint, called once by Create with `endpoint` plus the
  // Transceiver's on_transfer_update hook (so it wakes up when writes complete).
  TransportFactory create_transport;
  transport::EndpointOptions endpoint;
};

// The context side's task: send one slice of one request (the whole prompt, or one
// chunk in prompt order as prefill chunks finish: slice_id 0, 1, ...).
struct ContextRequest {
  uint64_t unique_rid = 0;
  int64_t prompt_len = 0;
  int64_t slice_id = 0;
  // Default: [0, prompt_len). A chunk: its range; the chunk reaching prompt_len is
  // the last slice.
  std::optional<transfer::TokenRange> token_range;
  // Sent to every generation rank once the last slice is delivered.
  std::vector<int64_t> aux_tokens;
  std::optional<int64_t> state_slot;  // the request's Mamba state slot here
  std::optional<absl::Duration> timeout;
};

// The generation side's task: receive one request.
struct GenerationRequest {
  uint64_t unique_rid = 0;
  int64_t prompt_len = 0;
  std::string context_instance;  // the instance holding the prefill (AddPeerInstance)
  int64_t context_dp_rank = 0;   // with attention DP on the context side
  // The slices the context side sends, in prompt order; empty: one slice
  // [0, prompt_len). Must match the context side's chunks.
  std::vector<transfer::TokenRange> slices;
  // A generation-only request consults the prefix cache (SEMANTICS.md section 3).
  bool generation_only = true;
  std::optional<int64_t> dst_start_token;
  std::optional<int64_t> aux_slot;
  std::optional<int64_t> state_slot;
  std::optional<absl::Duration> timeout;
};

struct RequestMetrics {
  uint64_t bytes = 0;         // moved (sender: posted and delivered; receiver: reported)
  int64_t writes = 0;         // coalesced fragments posted
  int64_t fragments = 0;      // before coalescing (sender)
  int64_t blocks = 0;         // block pairs planned (sender)
  int64_t blocks_skipped = 0; // blocks the sender holds that did not move (reuse, window)
  absl::Duration plan;        // pairing and fragment planning
  absl::Duration post;        // PostWrites
  absl::Duration transfer;    // from the first post to the last delivery
  absl::Duration total;       // from the engine's call to final
};

struct RequestStatus {
  uint64_t unique_rid = 0;
  Role role = Role::kContext;
  SessionState state = SessionState::kInit;
  // kError: why (DeadlineExceeded is a timeout); kCancelled: Aborted.
  absl::Status error;
  std::vector<int64_t> aux_tokens;  // generation side, kFullyTransferred
  // Generation side, kFullyTransferred: what CommitReceivedBlocks returned.
  absl::Status commit;
  RequestMetrics metrics;

  // Final: nothing of the request is in flight; its pages may be released.
  bool final() const { return transfer::IsFinal(state); }
};

struct TransceiverMetrics {
  int64_t requests_started = 0;
  int64_t requests_succeeded = 0;
  int64_t requests_failed = 0;
  int64_t requests_cancelled = 0;
  uint64_t bytes = 0;
  int64_t writes = 0;
  int64_t handshakes = 0;
  int64_t fences = 0;
  int64_t staged_chunks = 0;    // staging mode: chunks delivered (sender) or scattered
  int64_t bad_messages = 0;     // undecodable, or contradicting what is known
  int64_t dropped_messages = 0; // for unknown requests or from unknown ranks
  // Gauges, not counters: what the rank holds now (a soak run watches them for
  // leaks). Requests the engine started and has not collected yet (live, or final
  // and waiting for Check*TransferStatus).
  int64_t live_requests = 0;
  // Sender and receiver sessions held, including ones that request data alone
  // opened and ended ones kept for cancel_memory; and cancels remembered for
  // requests not seen yet. As of the rank thread's last pass: a request collected
  // final is no longer among them.
  int64_t sessions = 0;
  int64_t remembered_cancels = 0;
};

class Transceiver {
 public:
  // Validates the page table, registers every pool, opens the control channel and
  // starts the rank's thread. Errors: InvalidArgument (options, page table, a
  // missing adapter or transport); the transport's and channel's errors.
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<Transceiver>> Create(
      const TransceiverOptions& options, RankSetup setup);

  // Stops: every peer of a request that is not final hears that this rank is going
  // away (a Cancel, or FAILED results for pairs in flight), so none waits for its
  // deadline; the transport then ends what is in flight. Requests not collected
  // are dropped.
  ~Transceiver();
  Transceiver(const Transceiver&) = delete;
  Transceiver& operator=(const Transceiver&) = delete;

  // Where peer ranks reach this one (for the peer's AddPeerInstance).
  const std::string& control_address() const;
  // What this rank tells peers about itself.
  const transfer::RankInfo& rank_info() const;

  // Adds a peer instance by the control addresses of all its ranks: handshakes with
  // each at once (rank info both ways, CheckCompatible, transport connection and
  // grants), so the first request is not slow. Returns when every rank answered.
  // Errors: Unavailable naming the ranks that did not answer by `deadline`;
  // FailedPrecondition when a rank is incompatible (the field that differs) or has
  // the same role as this one; InvalidArgument for an empty list, and with CURVE
  // when no instance is named.
  ABSL_MUST_USE_RESULT absl::Status AddPeerInstance(
      absl::Span<const std::string> control_addresses, absl::Time deadline);
  // The same, naming the instance listening at `control_addresses`: with CURVE the
  // handshake goes out sealed for that instance's public key, so only it can read
  // this rank's page table, addresses and grants (with security off the name is
  // not used). Errors: as above; with CURVE also NotFound when `instance` is not in
  // the allowlist, FailedPrecondition when an address is known as another instance.
  ABSL_MUST_USE_RESULT absl::Status AddPeerInstance(
      absl::string_view instance, absl::Span<const std::string> control_addresses,
      absl::Time deadline);

  // Forgets a peer instance: its requests with this rank fail (Unavailable), its
  // ranks are fenced and disconnected. It may be added again (a restarted instance).
  // Errors: NotFound.
  ABSL_MUST_USE_RESULT absl::Status RemovePeerInstance(absl::string_view instance);

  // Context side: sends one slice of a request. Builds the slice through the cache
  // manager here, on the caller's thread. Errors: FailedPrecondition on a
  // generation rank, or for a slice of a request whose final status is waiting to
  // be collected (it ended: send no more of it); InvalidArgument for a malformed
  // request; the slice builder's errors (a block the transfer needs is gone);
  // ResourceExhausted past max_requests. Later failures end the request in kError.
  ABSL_MUST_USE_RESULT absl::Status RespondAndSendAsync(const ContextRequest& request);

  // Generation side: asks for a request's KV cache and receives it. Builds the
  // slices here, on the caller's thread. Errors: FailedPrecondition on a context
  // rank, or when the context instance is not (fully) added; AlreadyExists for a
  // request id in flight; otherwise as RespondAndSendAsync.
  ABSL_MUST_USE_RESULT absl::Status RequestAndReceiveAsync(const GenerationRequest& request);

  // The requests of each side that became final since the last call, which are
  // then forgotten. Waits until at least `at_least` are available or `deadline`
  // passes (InfinitePast: never waits). On the generation side, commits each fully
  // transferred request's blocks for reuse on the caller's thread first.
  std::vector<RequestStatus> CheckContextTransferStatus(size_t at_least, absl::Time deadline);
  std::vector<RequestStatus> CheckGenTransferStatus(size_t at_least, absl::Time deadline);

  // The current status of a request not yet collected. NotFound otherwise.
  ABSL_MUST_USE_RESULT absl::StatusOr<RequestStatus> GetStatus(uint64_t unique_rid) const;

  // Cancels a request (also one this rank has not seen yet: remembered for
  // cancel_memory). A write in flight is never interrupted: the request becomes
  // final (kCancelled) once nothing of it is in flight.
  ABSL_MUST_USE_RESULT absl::Status CancelRequest(uint64_t unique_rid);

  TransceiverMetrics metrics() const;

  struct Impl;  // transceiver.cc

 private:
  explicit Transceiver(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvx::transceiver

#endif  // KVX_TRANSFER_TRANSCEIVER_TRANSCEIVER_H_
