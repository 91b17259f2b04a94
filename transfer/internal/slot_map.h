// Do not include directly: detail of transfer/fragments.h.
// IWYU pragma: private, include "transfer/fragments.h"
//
// What one source slot contributes to one destination slot for a layer group (or a
// state group) of a rank pair: built once per pair, shifted per block pair.

#ifndef KVX_TRANSFER_INTERNAL_SLOT_MAP_H_
#define KVX_TRANSFER_INTERNAL_SLOT_MAP_H_

#include <cstdint>
#include <vector>

#include "transfer/fragments.h"

namespace kvx::transfer_internal {

using transfer::MapperKind;

// Bytes [src_offset, +bytes) of a source slot go to [dst_offset, +bytes) of a
// destination slot.
struct SlotPiece {
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t bytes = 0;
};

struct SlotMap {
  MapperKind kind = MapperKind::kNone;
  int64_t src_pool = 0;
  int64_t dst_pool = 0;
  uint64_t src_slot_bytes = 0;
  uint64_t dst_slot_bytes = 0;
  int64_t src_num_slots = 0;
  int64_t dst_num_slots = 0;
  std::vector<SlotPiece> pieces;         // coalesced within the slot, in order
  int64_t pieces_before_coalescing = 0;  // what the mapper emits per block
};

}  // namespace kvx::transfer_internal

#endif  // KVX_TRANSFER_INTERNAL_SLOT_MAP_H_
