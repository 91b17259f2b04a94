// File: transfer/page_table.h
//
// The page table a rank advertises to its peers (SEMANTICS.md section 6): the
// physical pools its KV cache lives in, the attention layer groups with the pool
// view that locates each layer's K and V buffer inside a slot, Mamba-style state
// groups, the model's shape and the rank's topology. A peer's table arrives over
// the wire and is untrusted: ValidatePageTable checks it before any plan uses it,
// and CheckCompatible says which field two ranks disagree on.
//
// Layout of one K (or V) buffer of one layer in a slot: [head][token-in-block][dim],
// each element `element_bytes` wide, so `kv_heads_per_rank` heads of one block
// take kv_heads_per_rank * tokens_per_block * head_size * element_bytes bytes, and
// a run of heads is one contiguous byte range. With MLA a layer has one buffer (the
// latent, "K"), one "head" wide; v_offset is ignored.
//
// Example: one full-attention group of 2 layers, 4 heads, K and V of each layer
// back to back in a slot.
//
//   RankPageTable table;
//   table.tokens_per_block = 32; table.head_size = 128; table.element_bytes = 2;
//   table.num_kv_heads = 4;
//   table.topology.layers_per_pp_rank = {2};
//   const uint64_t kv = 4 * 32 * 128 * 2;  // one K or V buffer
//   table.pools = {Pool{base, 4 * kv, 1024, PoolRole::kKVCache}};
//   AttentionGroup group;
//   group.kv_heads_per_rank = 4;
//   group.global_layer_ids = {0, 1};
//   group.view = PoolView{0, {{0, kv}, {2 * kv, 3 * kv}}};
//   table.attention_groups = {group};
//   absl::Status valid = ValidatePageTable(table);  // OK
//
// Thread safety: plain values and pure functions.

#ifndef KVX_TRANSFER_PAGE_TABLE_H_
#define KVX_TRANSFER_PAGE_TABLE_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "transfer/topology.h"

namespace kvx::transfer {

// What a pool's slots hold; views of one kind only point into pools of that role.
enum class PoolRole { kKVCache, kMambaState };

// A registered region of `num_slots` slots of `slot_bytes` each, from
// `base_address` (a virtual address in the rank's process; plans use offsets).
struct Pool {
  uint64_t base_address = 0;
  uint64_t slot_bytes = 0;
  int64_t num_slots = 0;
  PoolRole role = PoolRole::kKVCache;
};

// Where one layer's K and V buffers start inside a slot, in bytes.
struct LayerBuffers {
  uint64_t k_offset = 0;
  uint64_t v_offset = 0;  // ignored with MLA
};

// The slots of `pool_index` hold one block of a layer group: entry i locates the
// buffers of the group's i-th local layer.
struct PoolView {
  int64_t pool_index = 0;
  std::vector<LayerBuffers> layers;
};

// An attention layer group: the layers sharing one block table (and window).
// Group indices are the same on every rank of both instances (the slices' block
// lists are indexed by them); a rank lists only the global layers it holds, which
// may be none.
struct AttentionGroup {
  std::optional<int64_t> window;  // tokens; nullopt for full attention
  int64_t kv_heads_per_rank = 0;  // heads this rank holds (MLA: 1)
  // Strictly increasing, inside the rank's PP layer span. The local layer id of
  // entry i is global_layer_ids[i] - PpLayerSpan(topology).first.
  std::vector<int64_t> global_layer_ids;
  PoolView view;  // view.layers[i] belongs to global_layer_ids[i]
};

// One layer's recurrent state inside a state slot.
struct StateBuffer {
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

// Mamba-style state: one slot per request (the slice's mamba_state_index) holding
// every listed layer's state. Copied per common layer when both sides have it.
struct StateGroup {
  std::vector<int64_t> global_layer_ids;  // strictly increasing, in the PP span
  int64_t pool_index = 0;
  std::vector<StateBuffer> layers;  // parallel to global_layer_ids
};

// A slice group that is a Mamba state group (RankPageTable::slice_groups).
inline constexpr int64_t kStateSliceGroup = -1;

// Everything a rank advertises about its KV cache.
struct RankPageTable {
  std::vector<Pool> pools;
  std::vector<AttentionGroup> attention_groups;
  std::vector<StateGroup> state_groups;
  // The layer groups of the slices (SEMANTICS.md section 4), in slice order, when
  // they are not exactly attention_groups: entry i is the index of the attention
  // group that slice group i is, or kStateSliceGroup for a Mamba group (whose block
  // list is always empty). Empty: slice group i is attention group i.
  std::vector<int64_t> slice_groups;
  int64_t tokens_per_block = 0;
  int64_t head_size = 0;      // elements per head per token
  int64_t element_bytes = 0;  // 2 for bf16
  int64_t num_kv_heads = 0;   // of the whole model (MLA: any positive value)
  bool is_mla = false;
  Topology topology;
};

// Bytes of one K (or V) buffer of one layer in a slot:
// kv_heads_per_rank * tokens_per_block * head_size * element_bytes.
// REQUIRES: ValidatePageTable(table).ok().
uint64_t KVBufferBytes(const RankPageTable& table, const AttentionGroup& group);

// Bytes of one head of one block in a K or V buffer.
// REQUIRES: ValidatePageTable(table).ok().
uint64_t HeadBlockBytes(const RankPageTable& table);

// Checks a (possibly peer-supplied) table: positive sizes; a valid topology; pools
// with nonzero slot bytes and slots, base + slot_bytes * num_slots without
// overflow, pairwise disjoint; every view inside a pool of the right role and
// every K/V or state buffer inside its slot; global layer ids strictly increasing
// inside the rank's PP span, each layer of the span in exactly one attention group
// (a Mamba state layer may be in none); kv_heads_per_rank equal to the rank's TP head share;
// windows positive; slice_groups naming every attention group exactly once.
// Returns InvalidArgument naming the group, layer, pool and
// numbers; Unimplemented for an unsupported head split (see TpHeadShard).
ABSL_MUST_USE_RESULT absl::Status ValidatePageTable(const RankPageTable& table);

// Two ranks can exchange KV cache only when they agree on tokens per block, head
// size, element size, total layers, MLA, KV head count, their attention groups'
// number and windows, the slice group order, and which group each common global
// layer belongs to. Returns FailedPrecondition naming the first field that
// differs and both values ("field=head_size self=128 peer=64").
ABSL_MUST_USE_RESULT absl::Status CheckCompatible(const RankPageTable& self,
                                                  const RankPageTable& peer);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_PAGE_TABLE_H_
