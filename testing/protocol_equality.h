// File: testing/protocol_equality.h
//
// Field-by-field equality of the control-plane messages of transfer/protocol.h and
// the records they hold, for round trips in tests and fuzzers ("decode, encode,
// decode again: equal"); the library's types have none, on purpose (nothing in the
// library compares messages).
//
//   absl::StatusOr<Message> decoded = DecodeMessage(EncodeMessage(message));
//   EXPECT_TRUE(*decoded == message);
//
// The operators live in kvx::transfer, not kvx::testing: the comparisons of
// std::vector, std::optional and std::variant find them there by argument-dependent
// lookup, and nowhere else.
//
// Thread safety: pure functions.

#ifndef KVX_TESTING_PROTOCOL_EQUALITY_H_
#define KVX_TESTING_PROTOCOL_EQUALITY_H_

#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/topology.h"

namespace kvx::transfer {

bool operator==(const Pool& a, const Pool& b);
bool operator==(const LayerBuffers& a, const LayerBuffers& b);
bool operator==(const PoolView& a, const PoolView& b);
bool operator==(const AttentionGroup& a, const AttentionGroup& b);
bool operator==(const StateBuffer& a, const StateBuffer& b);
bool operator==(const StateGroup& a, const StateGroup& b);
bool operator==(const Topology& a, const Topology& b);
bool operator==(const RankPageTable& a, const RankPageTable& b);
bool operator==(const RankInfo& a, const RankInfo& b);
bool operator==(const PoolGrant& a, const PoolGrant& b);
bool operator==(const RankInfoRequest& a, const RankInfoRequest& b);
bool operator==(const StagingGrant& a, const StagingGrant& b);
bool operator==(const RankInfoReply& a, const RankInfoReply& b);
bool operator==(const RequestData& a, const RequestData& b);
bool operator==(const SliceResult& a, const SliceResult& b);
bool operator==(const AuxTokens& a, const AuxTokens& b);
bool operator==(const StagedFragment& a, const StagedFragment& b);
bool operator==(const StagedChunk& a, const StagedChunk& b);
bool operator==(const StagingCredit& a, const StagingCredit& b);
bool operator==(const Cancel& a, const Cancel& b);

}  // namespace kvx::transfer

#endif  // KVX_TESTING_PROTOCOL_EQUALITY_H_
