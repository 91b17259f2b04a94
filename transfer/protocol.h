// File: transfer/protocol.h
//
// The control-plane messages between the ranks of a context instance (the sender of
// KV cache) and a generation instance (the receiver), and their codec
// (SEMANTICS.md section 7). The byte layout, field by field, is in
// transfer/PROTOCOL.md; every message travels as one ZeroMQ message whose payload
// is msgpack (no msgpack type appears here).
//
//   rank A                                   rank B
//   RankInfoRequest{A's info}        ---->   checks it, adds A's transport address
//                                    <----   RankInfoReply{B's info, grants for A}
//   RequestData{rid, slice, lists}   ---->   (generation -> context, per slice)
//                                    <----   SliceResult{rid, slice, SUCCESS|FAILED}
//                                    <----   AuxTokens{rid, tokens}
//   Cancel{rid}                      <--->   either direction, any time
//
//   Staging mode, for a pair whose writes are small (generation -> context grants a
//   staging region with the RankInfoReply):
//                                    <----   StagedChunk{rid, slice, slot, fragments}
//   StagingCredit{slot}              ---->   (after scattering the slot)
//
// A RankInfoReply may also come unsolicited: a generation rank sends one to a
// context rank whenever it (re)grants its pools (after the first handshake it
// initiated, or after it fenced that rank); `grant_epoch` orders them, and every
// RequestData names the epoch its writes must use.
//
// Example:
//
//   Message message = SliceResult{...};
//   std::string bytes = EncodeMessage(message);
//   absl::StatusOr<Message> decoded = DecodeMessage(bytes);  // strict and bounded
//
// Decoding is strict and bounded: an unknown kind or version, a missing, extra or
// wrong-typed field, a string over its fixed bound, a negative id, trailing bytes,
// or a page table that fails ValidatePageTable is InvalidArgument (the page table
// keeps ValidatePageTable's code) naming the message kind and field
// ("RequestData.block_ids_per_group[3][17]: negative block id: value=-4"); a
// message or list over DecodeLimits is ResourceExhausted. A first pass over the
// raw bytes and msgpack's own limits (depth, array, map, string sizes) stop a
// hostile message before it allocates: never more than a small multiple of its
// size, nor of the largest message DecodeLimits admits. Decoding never throws and
// never crashes.
//
// Thread safety: pure functions over plain values.

#ifndef KVX_TRANSFER_PROTOCOL_H_
#define KVX_TRANSFER_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"

namespace kvx::transfer {

// Version history: 1 is the first. A decoder accepts exactly the versions it knows;
// retired fields are never reused (PROTOCOL.md).
inline constexpr uint8_t kProtocolVersion = 1;

// Bound of SliceResult::reason and Cancel::reason. EncodeMessage cuts a longer
// reason to this length rather than produce a message the peer would refuse.
inline constexpr size_t kMaxReasonBytes = 1024;

// Which side of a transfer a rank is on. Typed on the wire, so a rank that takes
// itself for the other side is refused at the handshake.
enum class Role : uint8_t { kContext = 1, kGeneration = 2 };

// Where the rank that sent it lets the receiver of the message write: one entry per
// pool of the granting rank, in pool order (a transport::RegionDescriptor's fields;
// the session turns it back into one).
struct PoolGrant {
  uint64_t address = 0;
  uint64_t length = 0;
  uint64_t key = 0;
};

// What one rank tells a peer rank about itself.
struct RankInfo {
  std::string instance;           // The instance's name; 1..256 printable bytes.
  Role role = Role::kContext;
  int64_t rank = 0;               // pp_rank * tp_size + tp_rank of page_table.topology
  std::string control_address;    // ControlChannel::address(); 1..256 printable bytes.
  std::string transport_address;  // Transport::address(), opaque; 1..4096 bytes.
  RankPageTable page_table;       // Validated on decode (ValidatePageTable).
};

// "Here is who I am; tell me who you are."
struct RankInfoRequest {
  RankInfo sender;
};

// Where a generation rank lets one context rank stage small writes (the staging
// mode: gather, one write, scatter): `slots` slots of `slot_bytes` each, back to
// back from the start of `region`. The decoder refuses slots that do not fit.
struct StagingGrant {
  PoolGrant region;
  uint64_t slot_bytes = 0;
  uint32_t slots = 0;
};

// "Here is who I am", with the grants the sender gives the receiver (empty when the
// receiver never writes to the sender, e.g. from a context rank). The decoder
// refuses any other number of grants than none or one per pool.
struct RankInfoReply {
  RankInfo sender;
  uint64_t grant_epoch = 0;          // Increases with every new set of grants.
  std::vector<PoolGrant> grants;     // One per pool of the sender, or none.
  std::optional<StagingGrant> staging;  // Present when the sender offers staging.
};

// The receiver's request data for one request and slice: its suffix block lists
// (SEMANTICS.md sections 1 and 4), sent by a generation rank to each context rank
// that overlaps it.
struct RequestData {
  uint64_t unique_rid = 0;
  int64_t slice_id = 0;             // 0, 1, ... in prompt order
  int64_t receiver_rank = 0;        // the generation rank sending it
  int64_t prompt_len = 0;           // the request's; the windows' stale blocks need it
  int64_t token_start = 0;          // the slice's token range [token_start, token_end)
  int64_t token_end = 0;
  bool is_last_slice = false;
  std::vector<BlockList> block_ids_per_group;  // per slice group
  std::optional<int64_t> dst_start_token;      // section 5 step 5
  std::optional<int64_t> aux_slot;             // echoed in AuxTokens
  std::optional<int64_t> state_slot;           // the receiver's Mamba state slot
  int64_t dp_rank = 0;                         // the request's DP rank on this side
  uint64_t grant_epoch = 0;                    // the grants the writes must use
};

enum class SliceOutcome : uint8_t { kSuccess = 1, kFailed = 2 };

// One sender rank's result for one slice, sent to one receiver rank once its writes
// are delivered (kSuccess) or have failed (section 7: exactly one per slice and
// overlapping pair, also for an empty write).
struct SliceResult {
  uint64_t unique_rid = 0;
  int64_t slice_id = 0;
  int64_t sender_rank = 0;
  SliceOutcome outcome = SliceOutcome::kSuccess;
  bool is_last_slice = false;
  // kFailed: the absl::StatusCode (never OK) and a reason (up to kMaxReasonBytes).
  // kSuccess: code 0. The decoder refuses any other combination.
  int32_t code = 0;
  std::string reason;
  // kFailed: true when nothing of this slice can still land in the receiver's
  // memory (the sender's transfer quiesced settled, or posted nothing); false means
  // the receiver must fence the sender before reusing the pages.
  bool settled = true;
  uint64_t bytes = 0;   // moved for this slice and pair
  int64_t writes = 0;   // posted (coalesced fragments)
  // kSuccess: how many StagedChunks of this slice and pair the receiver must scatter
  // before the slice is complete (0 when none was staged).
  int64_t staged_chunks = 0;
};

// Auxiliary tokens (the first generated token, draft tokens) of a request, sent by
// each context rank to each generation rank it overlaps once the request's KV is
// sent; the receiver keeps the first copy and refuses a different second one.
struct AuxTokens {
  uint64_t unique_rid = 0;
  int64_t sender_rank = 0;
  std::optional<int64_t> aux_slot;  // as the receiver's RequestData named it
  std::vector<int64_t> tokens;      // at most 4096
};

// Cancels a request, in either direction, also before the peer has a session for it
// (the peer remembers it for a while).
struct Cancel {
  uint64_t unique_rid = 0;
  int64_t sender_rank = 0;
  Role from = Role::kContext;
  std::string reason;  // up to kMaxReasonBytes
};

// One destination range of a staged chunk: `bytes` bytes at `offset` of pool `pool`
// of the receiving rank.
struct StagedFragment {
  int64_t pool = 0;
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

// A chunk of one slice's writes that the sender gathered and wrote, in one write,
// into staging slot `slot` of the receiver (its StagingGrant): the fragments' bytes
// lie back to back from the slot's start, in this order. Sent only once that write
// is delivered; the receiver scatters it into its pools, then answers with a
// StagingCredit. The sender fills a slot again only after that credit, and numbers
// its chunks with `seq` (from 1, increasing over its whole life), so a receiver
// scatters a slot only for a `seq` above the last it scattered there: a repeated or
// late copy never scatters what the slot holds now. Messages may come in any order;
// the SliceResult says how many chunks the receiver must have scattered.
struct StagedChunk {
  uint64_t unique_rid = 0;
  int64_t slice_id = 0;
  int64_t sender_rank = 0;
  uint32_t slot = 0;
  uint64_t seq = 0;
  std::vector<StagedFragment> fragments;
};

// The receiver is done with chunk `seq` in staging slot `slot`: the sender may fill
// the slot again, unless it already holds a later chunk (a repeated credit).
struct StagingCredit {
  int64_t receiver_rank = 0;
  uint32_t slot = 0;
  uint64_t seq = 0;
};

using Message = std::variant<RankInfoRequest, RankInfoReply, RequestData, SliceResult,
                             AuxTokens, Cancel, StagedChunk, StagingCredit>;

// The name of the message's kind ("RequestData"), for logs and metrics.
absl::string_view MessageKindName(const Message& message);

// Bounds a decoder enforces (ResourceExhausted past them); the defaults fit a
// 1M-token prompt at 16 tokens per block in 64 groups.
struct DecodeLimits {
  size_t max_message_bytes = size_t{64} << 20;
  size_t max_block_ids = size_t{1} << 22;  // summed over a RequestData's lists
  // Lists per RequestData; attention, state and slice groups each, per table.
  size_t max_groups = 1024;
  size_t max_pools = 1024;  // pools per table, grants per RankInfoReply
  // Layer entries summed over a table: every element of the groups'
  // global_layer_ids, view.layers and StateGroup::layers, and of
  // topology.layers_per_pp_rank.
  size_t max_layers = 65536;
  size_t max_aux_tokens = 4096;
  size_t max_staged_fragments = size_t{1} << 20;  // per StagedChunk
  // tp_size * pp_size of a rank info's topology: every rank of a peer instance
  // is a loop iteration when ranks are paired.
  size_t max_ranks = 65536;
};

// Serializes `message` (msgpack, PROTOCOL.md). Never fails: a value the decoder
// would refuse (a negative id, a list over the limits) still encodes and is refused
// by the peer's decoder; only a reason is cut (kMaxReasonBytes).
// REQUIRES: every list and string shorter than 2^32 entries (msgpack's bound).
std::string EncodeMessage(const Message& message);

// Parses one message from untrusted bytes. Errors, each naming the kind and field:
// InvalidArgument for malformed input (see the file comment); ResourceExhausted for
// a message or list over `limits`; a page table's ValidatePageTable error with its
// own code (InvalidArgument, or Unimplemented for an unsupported head split).
ABSL_MUST_USE_RESULT absl::StatusOr<Message> DecodeMessage(
    absl::string_view bytes, const DecodeLimits& limits = DecodeLimits());

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_PROTOCOL_H_
