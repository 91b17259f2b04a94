#include "testing/protocol_equality.h"

#include <tuple>

#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/topology.h"

namespace kvx::transfer {

bool operator==(const Pool& a, const Pool& b) {
  return std::tie(a.base_address, a.slot_bytes, a.num_slots, a.role) ==
         std::tie(b.base_address, b.slot_bytes, b.num_slots, b.role);
}
bool operator==(const LayerBuffers& a, const LayerBuffers& b) {
  return a.k_offset == b.k_offset && a.v_offset == b.v_offset;
}
bool operator==(const PoolView& a, const PoolView& b) {
  return a.pool_index == b.pool_index && a.layers == b.layers;
}
bool operator==(const AttentionGroup& a, const AttentionGroup& b) {
  return std::tie(a.window, a.kv_heads_per_rank, a.global_layer_ids, a.view) ==
         std::tie(b.window, b.kv_heads_per_rank, b.global_layer_ids, b.view);
}
bool operator==(const StateBuffer& a, const StateBuffer& b) {
  return a.offset == b.offset && a.bytes == b.bytes;
}
bool operator==(const StateGroup& a, const StateGroup& b) {
  return std::tie(a.global_layer_ids, a.pool_index, a.layers) ==
         std::tie(b.global_layer_ids, b.pool_index, b.layers);
}
bool operator==(const Topology& a, const Topology& b) {
  return std::tie(a.tp_size, a.tp_rank, a.pp_size, a.pp_rank, a.layers_per_pp_rank,
                  a.attention_dp) == std::tie(b.tp_size, b.tp_rank, b.pp_size, b.pp_rank,
                                              b.layers_per_pp_rank, b.attention_dp);
}
bool operator==(const RankPageTable& a, const RankPageTable& b) {
  return std::tie(a.pools, a.attention_groups, a.state_groups, a.slice_groups,
                  a.tokens_per_block, a.head_size, a.element_bytes, a.num_kv_heads,
                  a.is_mla, a.topology) ==
         std::tie(b.pools, b.attention_groups, b.state_groups, b.slice_groups,
                  b.tokens_per_block, b.head_size, b.element_bytes, b.num_kv_heads,
                  b.is_mla, b.topology);
}
bool operator==(const RankInfo& a, const RankInfo& b) {
  return std::tie(a.instance, a.role, a.rank, a.control_address, a.transport_address,
                  a.page_table) == std::tie(b.instance, b.role, b.rank, b.control_address,
                                            b.transport_address, b.page_table);
}
bool operator==(const PoolGrant& a, const PoolGrant& b) {
  return std::tie(a.address, a.length, a.key) == std::tie(b.address, b.length, b.key);
}
bool operator==(const RankInfoRequest& a, const RankInfoRequest& b) {
  return a.sender == b.sender;
}
bool operator==(const StagingGrant& a, const StagingGrant& b) {
  return std::tie(a.region, a.slot_bytes, a.slots) == std::tie(b.region, b.slot_bytes, b.slots);
}
bool operator==(const RankInfoReply& a, const RankInfoReply& b) {
  return std::tie(a.sender, a.grant_epoch, a.grants, a.staging) ==
         std::tie(b.sender, b.grant_epoch, b.grants, b.staging);
}
bool operator==(const RequestData& a, const RequestData& b) {
  return std::tie(a.unique_rid, a.slice_id, a.receiver_rank, a.prompt_len, a.token_start,
                  a.token_end, a.is_last_slice, a.block_ids_per_group, a.dst_start_token,
                  a.aux_slot, a.state_slot, a.dp_rank, a.grant_epoch) ==
         std::tie(b.unique_rid, b.slice_id, b.receiver_rank, b.prompt_len, b.token_start,
                  b.token_end, b.is_last_slice, b.block_ids_per_group, b.dst_start_token,
                  b.aux_slot, b.state_slot, b.dp_rank, b.grant_epoch);
}
bool operator==(const SliceResult& a, const SliceResult& b) {
  return std::tie(a.unique_rid, a.slice_id, a.sender_rank, a.outcome, a.is_last_slice,
                  a.code, a.reason, a.settled, a.bytes, a.writes, a.staged_chunks) ==
         std::tie(b.unique_rid, b.slice_id, b.sender_rank, b.outcome, b.is_last_slice,
                  b.code, b.reason, b.settled, b.bytes, b.writes, b.staged_chunks);
}
bool operator==(const AuxTokens& a, const AuxTokens& b) {
  return std::tie(a.unique_rid, a.sender_rank, a.aux_slot, a.tokens) ==
         std::tie(b.unique_rid, b.sender_rank, b.aux_slot, b.tokens);
}
bool operator==(const StagedFragment& a, const StagedFragment& b) {
  return std::tie(a.pool, a.offset, a.bytes) == std::tie(b.pool, b.offset, b.bytes);
}
bool operator==(const StagedChunk& a, const StagedChunk& b) {
  return std::tie(a.unique_rid, a.slice_id, a.sender_rank, a.slot, a.seq, a.fragments) ==
         std::tie(b.unique_rid, b.slice_id, b.sender_rank, b.slot, b.seq, b.fragments);
}
bool operator==(const StagingCredit& a, const StagingCredit& b) {
  return std::tie(a.receiver_rank, a.slot, a.seq) == std::tie(b.receiver_rank, b.slot, b.seq);
}
bool operator==(const Cancel& a, const Cancel& b) {
  return std::tie(a.unique_rid, a.sender_rank, a.from, a.reason) ==
         std::tie(b.unique_rid, b.sender_rank, b.from, b.reason);
}

}  // namespace kvx::transfer
