#include "transfer/protocol.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "msgpack.hpp"
#include "testing/protocol_equality.h"
#include "testing/status_matchers.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();
constexpr int64_t kMaxI64 = std::numeric_limits<int64_t>::max();
constexpr int64_t kMinI64 = std::numeric_limits<int64_t>::min();

// ---------------------------------------------------------------------------
// Valid messages.

// TP4 x PP3 (layers 2 + 3 + 2), this rank tp 1 / pp 2 (rank 9), 8 KV heads (2
// here), tpb 16: a full group holding layers 5 and 6, a windowed group holding
// none of its layers here, and a Mamba state group, with slice groups
// [0, state, 1]. Distinct values throughout, so that a codec swapping two fields
// fails the round trip.
RankPageTable ValidTable() {
  RankPageTable table;
  table.tokens_per_block = 16;
  table.head_size = 64;
  table.element_bytes = 2;
  table.num_kv_heads = 8;
  table.topology = MakeTopology(4, {2, 3, 2}, /*tp_rank=*/1, /*pp_rank=*/2);
  const uint64_t kv = 2 * 16 * 64 * 2;
  table.pools = {Pool{1 << 20, 4 * kv, 8, PoolRole::kKVCache},
                 Pool{1 << 24, 256, 4, PoolRole::kMambaState}};
  AttentionGroup full;
  full.kv_heads_per_rank = 2;
  full.global_layer_ids = {5, 6};
  full.view = PoolView{0, {{0, kv}, {2 * kv, 3 * kv}}};
  AttentionGroup windowed;
  windowed.window = 64;
  windowed.kv_heads_per_rank = 2;
  table.attention_groups = {full, windowed};
  table.state_groups = {StateGroup{{6}, 1, {{32, 128}}}};
  table.slice_groups = {0, kStateSliceGroup, 1};
  return table;
}

// The smallest valid table: one rank, one layer in one group (every layer must be
// in one), one pool of one slot holding its K and V of one byte each.
RankPageTable MinimalTable() {
  RankPageTable table;
  table.tokens_per_block = 1;
  table.head_size = 1;
  table.element_bytes = 1;
  table.num_kv_heads = 1;
  table.topology = MakeTopology(1, {1});
  table.pools = {Pool{0x1000, 2, 1, PoolRole::kKVCache}};
  AttentionGroup group;
  group.kv_heads_per_rank = 1;
  group.global_layer_ids = {0};
  group.view = PoolView{0, {{0, 1}}};
  table.attention_groups = {group};
  return table;
}

RankInfo ValidRankInfo() {
  RankInfo info;
  info.instance = "context-0";
  info.role = Role::kContext;
  info.rank = 9;
  info.control_address = "tcp://127.0.0.1:5555";
  info.transport_address = std::string("\0\x01kvx\xff", 6);
  info.page_table = ValidTable();
  return info;
}

// Every byte value, cycled to `size` bytes.
std::string AllBytes(size_t size) {
  std::string s(size, '\0');
  for (size_t i = 0; i < size; ++i) s[i] = static_cast<char>(i % 256);
  return s;
}

// Printable ASCII, cycled to `size` bytes.
std::string Printable(size_t size) {
  std::string s(size, ' ');
  for (size_t i = 0; i < size; ++i) s[i] = static_cast<char>(0x20 + i % 95);
  return s;
}

struct Named {
  std::string name;
  Message message;
};

// One moderate message of each kind with every optional present: the inputs of
// the rejection sweeps, the truncation test and the mutation test.
std::vector<Named> TypicalMessages() {
  RankInfoReply reply;
  reply.sender = ValidRankInfo();
  reply.sender.role = Role::kGeneration;
  reply.grant_epoch = 7;
  reply.grants = {PoolGrant{1 << 20, 8192, 0x1234}, PoolGrant{1 << 24, 1024, 0x5678}};
  reply.staging = StagingGrant{PoolGrant{1 << 28, 4 << 20, 0x9abc}, 1 << 20, 4};
  RequestData data;
  data.unique_rid = 42;
  data.slice_id = 1;
  data.receiver_rank = 2;
  data.prompt_len = 1000;
  data.token_start = 512;
  data.token_end = 960;
  data.is_last_slice = true;
  data.block_ids_per_group = {BlockList(18, 0), {7, 8}, {}, {1, 2, 3, 4, 5}};
  for (size_t i = 0; i < 18; ++i) data.block_ids_per_group[0][i] = 100 + i;
  data.dst_start_token = 528;
  data.aux_slot = 3;
  data.state_slot = 9;
  data.dp_rank = 5;
  data.grant_epoch = 7;
  SliceResult failed;
  failed.unique_rid = 42;
  failed.slice_id = 1;
  failed.sender_rank = 3;
  failed.outcome = SliceOutcome::kFailed;
  failed.is_last_slice = true;
  failed.code = static_cast<int32_t>(absl::StatusCode::kDeadlineExceeded);
  failed.reason = "write deadline passed: peer=2";
  failed.settled = false;
  failed.bytes = 4096;
  failed.writes = 2;
  AuxTokens aux{42, 3, 5, {11, 12, 13}};
  Cancel cancel{42, 2, Role::kGeneration, "engine aborted the request"};
  StagedChunk chunk{42, 1, 3, 2, 77, {{0, 4096, 512}, {1, 0, 100}, {0, 1 << 30, 7}}};
  StagingCredit credit{2, 3, 77};
  return {{"RankInfoRequest", RankInfoRequest{ValidRankInfo()}},
          {"RankInfoReply", reply},
          {"RequestData", data},
          {"SliceResult", failed},
          {"AuxTokens", aux},
          {"Cancel", cancel},
          {"StagedChunk", chunk},
          {"StagingCredit", credit}};
}

// Edges of every kind: zeros, maxima, optionals absent and present, empty and
// large lists, strings at their bounds.
std::vector<Named> ExtremeMessages() {
  std::vector<Named> messages;
  RankInfo small;
  small.instance = "a";
  small.role = Role::kGeneration;
  small.rank = 0;
  small.control_address = "b";
  small.transport_address = std::string(1, '\0');
  small.page_table = MinimalTable();
  RankInfo large = ValidRankInfo();
  large.instance = Printable(256);
  large.control_address = Printable(256);
  large.transport_address = AllBytes(4096);
  messages.push_back({"RankInfoRequest minimal", RankInfoRequest{small}});
  messages.push_back({"RankInfoRequest largest strings", RankInfoRequest{large}});
  RankInfo mla = ValidRankInfo();
  mla.page_table.is_mla = true;
  for (AttentionGroup& group : mla.page_table.attention_groups)
    group.kv_heads_per_rank = 1;
  messages.push_back({"RankInfoRequest mla", RankInfoRequest{mla}});
  // Attention DP: every rank holds all 8 heads, so the buffers are 4x larger.
  RankInfo dp = ValidRankInfo();
  RankPageTable& dp_table = dp.page_table;
  dp_table.topology.attention_dp = true;
  const uint64_t kv = 8 * 16 * 64 * 2;
  dp_table.pools[0].slot_bytes = 4 * kv;
  for (AttentionGroup& group : dp_table.attention_groups) group.kv_heads_per_rank = 8;
  dp_table.attention_groups[0].view.layers = {{0, kv}, {2 * kv, 3 * kv}};
  messages.push_back({"RankInfoRequest attention dp", RankInfoRequest{dp}});

  messages.push_back({"RankInfoReply no grants", RankInfoReply{small, 0, {}}});
  RankInfoReply staging_only{ValidRankInfo(), 3, {}};
  staging_only.staging = StagingGrant{PoolGrant{0, 4 << 20, 0x9abc}, 1 << 20, 4};
  messages.push_back({"RankInfoReply staging only", staging_only});
  messages.push_back(
      {"RankInfoReply max grants",
       RankInfoReply{ValidRankInfo(),
                     kMaxU64,
                     {PoolGrant{kMaxU64, kMaxU64, kMaxU64}, PoolGrant{0, 0, 0}}}});

  messages.push_back({"RequestData zeros", RequestData{}});
  RequestData big;
  big.unique_rid = kMaxU64;
  big.slice_id = kMaxI64;
  big.receiver_rank = kMaxI64;
  big.prompt_len = kMaxI64;
  big.token_start = kMaxI64;
  big.token_end = kMaxI64;
  big.is_last_slice = true;
  big.block_ids_per_group.assign(64, BlockList(4096));
  for (size_t g = 0; g < 64; ++g) {
    for (size_t i = 0; i < 4096; ++i) {
      big.block_ids_per_group[g][i] =
          i == 0 ? kMaxI64 : static_cast<int64_t>(g << 32 | i);
    }
  }
  big.block_ids_per_group[5].clear();
  big.dst_start_token = 0;
  big.aux_slot = kMaxI64;
  big.state_slot = 0;
  big.dp_rank = kMaxI64;
  big.grant_epoch = kMaxU64;
  messages.push_back({"RequestData 64 groups x 4096 ids", big});

  messages.push_back({"SliceResult success zeros", SliceResult{}});
  SliceResult failed;
  failed.unique_rid = kMaxU64;
  failed.slice_id = kMaxI64;
  failed.sender_rank = kMaxI64;
  failed.outcome = SliceOutcome::kFailed;
  failed.code = static_cast<int32_t>(absl::StatusCode::kUnauthenticated);
  failed.reason = AllBytes(kMaxReasonBytes);
  failed.settled = false;
  failed.bytes = kMaxU64;
  failed.writes = kMaxI64;
  failed.staged_chunks = kMaxI64;
  messages.push_back({"SliceResult failed maxima", failed});
  SliceResult staged;
  staged.writes = 3;
  staged.staged_chunks = 3;
  messages.push_back({"SliceResult staged", staged});

  messages.push_back({"AuxTokens empty", AuxTokens{}});
  AuxTokens tokens{kMaxU64, kMaxI64, kMaxI64, std::vector<int64_t>(4096, kMaxI64)};
  tokens.tokens[0] = 0;
  messages.push_back({"AuxTokens 4096", tokens});

  messages.push_back({"Cancel empty", Cancel{}});
  messages.push_back(
      {"Cancel maxima", Cancel{kMaxU64, kMaxI64, Role::kGeneration, AllBytes(1024)}});
  return messages;
}

// ---------------------------------------------------------------------------
// An editable msgpack value: tests take a valid encoding apart, change one thing
// and pack it again (msgpack::object is read-only and zone-bound).
struct Node {
  msgpack::type::object_type type = msgpack::type::NIL;
  bool boolean = false;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0;
  std::string bytes;  // STR, BIN, EXT data
  int8_t ext_type = 0;
  std::vector<Node> items;  // ARRAY; MAP as key, value, key, value, ...
};

Node ToNode(const msgpack::object& o) {
  Node n;
  n.type = o.type;
  switch (o.type) {
    case msgpack::type::NIL:
      break;
    case msgpack::type::BOOLEAN:
      n.boolean = o.via.boolean;
      break;
    case msgpack::type::POSITIVE_INTEGER:
      n.u = o.via.u64;
      break;
    case msgpack::type::NEGATIVE_INTEGER:
      n.i = o.via.i64;
      break;
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64:
      n.f = o.via.f64;
      break;
    case msgpack::type::STR:
      n.bytes.assign(o.via.str.ptr, o.via.str.size);
      break;
    case msgpack::type::BIN:
      n.bytes.assign(o.via.bin.ptr, o.via.bin.size);
      break;
    case msgpack::type::EXT:
      n.ext_type = o.via.ext.type();
      n.bytes.assign(o.via.ext.data(), o.via.ext.size);
      break;
    case msgpack::type::ARRAY:
      for (uint32_t k = 0; k < o.via.array.size; ++k)
        n.items.push_back(ToNode(o.via.array.ptr[k]));
      break;
    case msgpack::type::MAP:
      for (uint32_t k = 0; k < o.via.map.size; ++k) {
        n.items.push_back(ToNode(o.via.map.ptr[k].key));
        n.items.push_back(ToNode(o.via.map.ptr[k].val));
      }
      break;
  }
  return n;
}

void PackNode(msgpack::packer<msgpack::sbuffer>& p, const Node& n) {
  switch (n.type) {
    case msgpack::type::NIL:
      p.pack_nil();
      break;
    case msgpack::type::BOOLEAN:
      p.pack(n.boolean);
      break;
    case msgpack::type::POSITIVE_INTEGER:
      p.pack_uint64(n.u);
      break;
    case msgpack::type::NEGATIVE_INTEGER:
      p.pack_int64(n.i);
      break;
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64:
      p.pack_double(n.f);
      break;
    case msgpack::type::STR:
      p.pack_str(static_cast<uint32_t>(n.bytes.size()));
      p.pack_str_body(n.bytes.data(), static_cast<uint32_t>(n.bytes.size()));
      break;
    case msgpack::type::BIN:
      p.pack_bin(static_cast<uint32_t>(n.bytes.size()));
      p.pack_bin_body(n.bytes.data(), static_cast<uint32_t>(n.bytes.size()));
      break;
    case msgpack::type::EXT:
      p.pack_ext(n.bytes.size(), n.ext_type);
      p.pack_ext_body(n.bytes.data(), static_cast<uint32_t>(n.bytes.size()));
      break;
    case msgpack::type::ARRAY:
      p.pack_array(static_cast<uint32_t>(n.items.size()));
      for (const Node& item : n.items) PackNode(p, item);
      break;
    case msgpack::type::MAP:
      p.pack_map(static_cast<uint32_t>(n.items.size() / 2));
      for (const Node& item : n.items) PackNode(p, item);
      break;
  }
}

Node Parse(const std::string& bytes) {
  msgpack::object_handle handle = msgpack::unpack(bytes.data(), bytes.size());
  return ToNode(handle.get());
}

std::string Serialize(const Node& n) {
  msgpack::sbuffer buffer;
  msgpack::packer<msgpack::sbuffer> packer(buffer);
  PackNode(packer, n);
  return std::string(buffer.data(), buffer.size());
}

Node& At(Node& root, const std::vector<size_t>& path) {
  Node* n = &root;
  for (size_t index : path) n = &n->items.at(index);
  return *n;
}

Node Uint(uint64_t v) {
  Node n;
  n.type = msgpack::type::POSITIVE_INTEGER;
  n.u = v;
  return n;
}
Node Int(int64_t v) {
  if (v >= 0) return Uint(static_cast<uint64_t>(v));
  Node n;
  n.type = msgpack::type::NEGATIVE_INTEGER;
  n.i = v;
  return n;
}
Node Text(msgpack::type::object_type type, std::string bytes) {
  Node n;
  n.type = type;
  n.bytes = std::move(bytes);
  return n;
}
Node Str(std::string bytes) { return Text(msgpack::type::STR, std::move(bytes)); }
Node Bin(std::string bytes) { return Text(msgpack::type::BIN, std::move(bytes)); }
Node Float(double v) {
  Node n;
  n.type = msgpack::type::FLOAT64;
  n.f = v;
  return n;
}
Node Nil() { return Node(); }
Node Array(std::vector<Node> items) {
  Node n;
  n.type = msgpack::type::ARRAY;
  n.items = std::move(items);
  return n;
}

Message Typical(absl::string_view name) {
  for (Named& named : TypicalMessages()) {
    if (named.name == name) return named.message;
  }
  ADD_FAILURE() << "no typical message " << name;
  return Message();
}

// The typical message of kind `name`, changed by `edit` and packed again.
std::string Edited(absl::string_view name, const std::function<void(Node&)>& edit) {
  Node root = Parse(EncodeMessage(Typical(name)));
  edit(root);
  return Serialize(root);
}

std::function<void(Node&)> Set(std::vector<size_t> path, Node value) {
  return [path, value](Node& root) { At(root, path) = value; };
}

// ---------------------------------------------------------------------------
// Round trips.

void ExpectRoundTrip(const Message& message) {
  const std::string bytes = EncodeMessage(message);
  absl::StatusOr<Message> decoded = DecodeMessage(bytes);
  ASSERT_THAT(decoded, IsOk());
  EXPECT_EQ(decoded->index(), message.index());
  EXPECT_TRUE(*decoded == message) << "kind=" << MessageKindName(message);
  EXPECT_EQ(EncodeMessage(*decoded), bytes);
}

TEST(Protocol, TablesUsedByTheTestsAreValid) {
  EXPECT_THAT(ValidatePageTable(ValidTable()), IsOk());
  EXPECT_THAT(ValidatePageTable(MinimalTable()), IsOk());
}

TEST(Protocol, EveryKindRoundTrips) {
  for (const Named& named : TypicalMessages()) {
    SCOPED_TRACE(named.name);
    ExpectRoundTrip(named.message);
  }
}

TEST(Protocol, ExtremeValuesRoundTrip) {
  for (const Named& named : ExtremeMessages()) {
    SCOPED_TRACE(named.name);
    ExpectRoundTrip(named.message);
  }
}

TEST(Protocol, OptionalFieldsRoundTripAbsentAndPresent) {
  for (std::optional<int64_t> value :
       {std::optional<int64_t>(), std::optional<int64_t>(0),
        std::optional<int64_t>(kMaxI64)}) {
    SCOPED_TRACE(value.has_value() ? absl::StrCat(*value) : "absent");
    RequestData data = std::get<RequestData>(Typical("RequestData"));
    data.dst_start_token = value;
    data.aux_slot = value;
    data.state_slot = value;
    ExpectRoundTrip(data);
    AuxTokens aux = std::get<AuxTokens>(Typical("AuxTokens"));
    aux.aux_slot = value;
    ExpectRoundTrip(aux);
    RankInfoRequest request{ValidRankInfo()};
    request.sender.page_table.attention_groups[1].window =
        value.has_value() ? std::optional<int64_t>(16) : std::nullopt;
    ExpectRoundTrip(request);
  }
}

TEST(Protocol, KindNames) {
  std::vector<std::string> names;
  for (const Named& named : TypicalMessages()) {
    EXPECT_EQ(MessageKindName(named.message), named.name);
    names.push_back(std::string(MessageKindName(named.message)));
  }
  EXPECT_EQ(names.size(), std::variant_size_v<Message>);
}

TEST(Protocol, WireKindAndVersionLeadEveryMessage) {
  uint8_t kind = 1;
  for (const Named& named : TypicalMessages()) {
    SCOPED_TRACE(named.name);
    Node root = Parse(EncodeMessage(named.message));
    ASSERT_EQ(root.type, msgpack::type::ARRAY);
    EXPECT_EQ(root.items.at(0).u, kind++);
    EXPECT_EQ(root.items.at(1).u, kProtocolVersion);
  }
}

TEST(Protocol, LongReasonIsCutToItsBound) {
  SliceResult result = std::get<SliceResult>(Typical("SliceResult"));
  result.reason = Printable(5000);
  absl::StatusOr<Message> decoded = DecodeMessage(EncodeMessage(result));
  ASSERT_THAT(decoded, IsOk());
  EXPECT_EQ(std::get<SliceResult>(*decoded).reason, Printable(kMaxReasonBytes));
  Cancel cancel{1, 2, Role::kContext, Printable(kMaxReasonBytes + 1)};
  decoded = DecodeMessage(EncodeMessage(cancel));
  ASSERT_THAT(decoded, IsOk());
  EXPECT_EQ(std::get<Cancel>(*decoded).reason, Printable(kMaxReasonBytes));
}

// ---------------------------------------------------------------------------
// Rejections, one row per rule; each names the kind and field.

struct RejectCase {
  std::string name;
  std::string bytes;
  absl::StatusCode code;
  std::string message;  // the whole error message
};

void ExpectRejections(const std::vector<RejectCase>& cases,
                      const DecodeLimits& limits = DecodeLimits()) {
  for (const RejectCase& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(DecodeMessage(c.bytes, limits), StatusIs(c.code, c.message));
  }
}

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr absl::StatusCode kExhausted = absl::StatusCode::kResourceExhausted;

TEST(Protocol, RejectsNegativeIdsAndPositions) {
  // RequestData fields: 2 unique_rid, 3 slice_id, 4 receiver_rank, 5 prompt_len,
  // 6 token_start, 7 token_end, 9 block_ids_per_group, 10 dst_start_token,
  // 11 aux_slot, 12 state_slot, 13 dp_rank.
  ExpectRejections({
      {"block id", Edited("RequestData", Set({9, 0, 17}, Int(-4))), kInvalid,
       "RequestData.block_ids_per_group[0][17]: negative block id: value=-4"},
      {"block id in a later list", Edited("RequestData", Set({9, 3, 4}, Int(-1))),
       kInvalid, "RequestData.block_ids_per_group[3][4]: negative block id: value=-1"},
      {"slice id", Edited("RequestData", Set({3}, Int(-1))), kInvalid,
       "RequestData.slice_id: negative slice id: value=-1"},
      {"receiver rank", Edited("RequestData", Set({4}, Int(-2))), kInvalid,
       "RequestData.receiver_rank: negative rank: value=-2"},
      {"prompt length", Edited("RequestData", Set({5}, Int(-3))), kInvalid,
       "RequestData.prompt_len: negative length: value=-3"},
      {"token start", Edited("RequestData", Set({6}, Int(-5))), kInvalid,
       "RequestData.token_start: negative token position: value=-5"},
      {"token end", Edited("RequestData", Set({7}, Int(-6))), kInvalid,
       "RequestData.token_end: negative token position: value=-6"},
      {"dst start token", Edited("RequestData", Set({10}, Int(-7))), kInvalid,
       "RequestData.dst_start_token: negative token position: value=-7"},
      {"aux slot", Edited("RequestData", Set({11}, Int(-8))), kInvalid,
       "RequestData.aux_slot: negative slot: value=-8"},
      {"state slot", Edited("RequestData", Set({12}, Int(kMinI64))), kInvalid,
       absl::StrCat("RequestData.state_slot: negative slot: value=", kMinI64)},
      {"dp rank", Edited("RequestData", Set({13}, Int(-1))), kInvalid,
       "RequestData.dp_rank: negative rank: value=-1"},
      {"result sender rank", Edited("SliceResult", Set({4}, Int(-1))), kInvalid,
       "SliceResult.sender_rank: negative rank: value=-1"},
      {"result writes", Edited("SliceResult", Set({11}, Int(-1))), kInvalid,
       "SliceResult.writes: negative count: value=-1"},
      {"result staged chunks", Edited("SliceResult", Set({12}, Int(-1))), kInvalid,
       "SliceResult.staged_chunks: negative count: value=-1"},
      {"token id", Edited("AuxTokens", Set({5, 2}, Int(-1))), kInvalid,
       "AuxTokens.tokens[2]: negative token id: value=-1"},
      {"aux tokens slot", Edited("AuxTokens", Set({4}, Int(-1))), kInvalid,
       "AuxTokens.aux_slot: negative slot: value=-1"},
      {"cancel sender rank", Edited("Cancel", Set({3}, Int(-1))), kInvalid,
       "Cancel.sender_rank: negative rank: value=-1"},
      {"rank info rank", Edited("RankInfoRequest", Set({2, 2}, Int(-3))), kInvalid,
       "RankInfoRequest.sender.rank: negative rank: value=-3"},
  });
}

TEST(Protocol, RejectsWrongTypes) {
  ExpectRejections({
      {"uint field negative", Edited("RequestData", Set({2}, Int(-1))), kInvalid,
       "RequestData.unique_rid: wrong type: expected=uint got=negative int"},
      {"int field beyond int64", Edited("RequestData", Set({3}, Uint(uint64_t{1} << 63))),
       kInvalid, "RequestData.slice_id: int out of range: value=9223372036854775808"},
      {"bool as an int", Edited("RequestData", Set({8}, Uint(1))), kInvalid,
       "RequestData.is_last_slice: wrong type: expected=bool got=uint"},
      {"list as a str", Edited("RequestData", Set({9}, Str("x"))), kInvalid,
       "RequestData.block_ids_per_group: wrong type: expected=array got=str"},
      {"block id as a float", Edited("RequestData", Set({9, 0, 0}, Float(1.5))), kInvalid,
       "RequestData.block_ids_per_group[0][0]: wrong type: expected=int got=float64"},
      {"block list as an int", Edited("RequestData", Set({9, 1}, Uint(1))), kInvalid,
       "RequestData.block_ids_per_group[1]: wrong type: expected=array got=uint"},
      {"optional as a str", Edited("RequestData", Set({10}, Str("1"))), kInvalid,
       "RequestData.dst_start_token: wrong type: expected=int got=str"},
      {"list as an empty map",
       Edited("RequestData",
              [](Node& root) {
                At(root, {9}) = Node();
                At(root, {9}).type = msgpack::type::MAP;
              }),
       kInvalid, "RequestData.block_ids_per_group: wrong type: expected=array got=map"},
      {"reason as a bin", Edited("SliceResult", Set({8}, Bin("x"))), kInvalid,
       "SliceResult.reason: wrong type: expected=str got=bin"},
      {"transport address as a str", Edited("RankInfoRequest", Set({2, 4}, Str("x"))),
       kInvalid,
       "RankInfoRequest.sender.transport_address: wrong type: expected=bin got=str"},
      {"instance as nil", Edited("RankInfoRequest", Set({2, 0}, Nil())), kInvalid,
       "RankInfoRequest.sender.instance: wrong type: expected=str got=nil"},
      {"window as a str", Edited("RankInfoRequest", Set({2, 5, 1, 1, 0}, Str("64"))),
       kInvalid,
       "RankInfoRequest.sender.page_table.attention_groups[1].window: wrong type: "
       "expected=int got=str"},
      {"k offset negative",
       Edited("RankInfoRequest", Set({2, 5, 1, 0, 3, 1, 1, 0}, Int(-1))), kInvalid,
       "RankInfoRequest.sender.page_table.attention_groups[0].view.layers[1].k_offset: "
       "wrong type: expected=uint got=negative int"},
      {"grant key as a str", Edited("RankInfoReply", Set({4, 1, 2}, Str("k"))), kInvalid,
       "RankInfoReply.grants[1].key: wrong type: expected=uint got=str"},
      {"whole message not an array", Serialize(Uint(3)), kInvalid,
       "message: wrong type: expected=array got=uint"},
  });
}

TEST(Protocol, RejectsUnknownEnumValues) {
  ExpectRejections({
      {"outcome", Edited("SliceResult", Set({5}, Uint(3))), kInvalid,
       "SliceResult.outcome: unknown outcome: value=3"},
      {"outcome zero", Edited("SliceResult", Set({5}, Uint(0))), kInvalid,
       "SliceResult.outcome: unknown outcome: value=0"},
      {"role", Edited("RankInfoRequest", Set({2, 1}, Uint(0))), kInvalid,
       "RankInfoRequest.sender.role: unknown role: value=0"},
      {"cancel from", Edited("Cancel", Set({4}, Uint(3))), kInvalid,
       "Cancel.from: unknown role: value=3"},
      {"pool role", Edited("RankInfoRequest", Set({2, 5, 0, 1, 3}, Uint(300))), kInvalid,
       "RankInfoRequest.sender.page_table.pools[1].role: unknown pool role: value=300"},
  });
}

TEST(Protocol, RejectsUnknownKindAndVersion) {
  ExpectRejections({
      {"kind 0", Edited("Cancel", Set({0}, Uint(0))), kInvalid,
       "message.kind: unknown message kind: kind=0"},
      {"kind 9", Edited("Cancel", Set({0}, Uint(9))), kInvalid,
       "message.kind: unknown message kind: kind=9"},
      {"kind huge", Edited("Cancel", Set({0}, Uint(kMaxU64))), kInvalid,
       "message.kind: unknown message kind: kind=18446744073709551615"},
      {"kind negative", Edited("Cancel", Set({0}, Int(-1))), kInvalid,
       "message.kind: wrong type: expected=uint got=negative int"},
      {"version 2", Edited("RequestData", Set({1}, Uint(2))), kInvalid,
       "RequestData.version: unsupported version: version=2 supported=1"},
      {"version 0", Edited("AuxTokens", Set({1}, Uint(0))), kInvalid,
       "AuxTokens.version: unsupported version: version=0 supported=1"},
      {"version as a str", Edited("SliceResult", Set({1}, Str("1"))), kInvalid,
       "SliceResult.version: wrong type: expected=uint got=str"},
      {"no kind", Serialize(Array({})), kInvalid,
       "message: missing kind or version: fields=0"},
      {"no version", Serialize(Array({Uint(3)})), kInvalid,
       "RequestData: missing kind or version: fields=1"},
  });
}

TEST(Protocol, RejectsStringsOutOfBounds) {
  ExpectRejections({
      {"empty instance", Edited("RankInfoRequest", Set({2, 0}, Str(""))), kInvalid,
       "RankInfoRequest.sender.instance: length out of range: bytes=0 min=1 max=256"},
      {"long instance", Edited("RankInfoRequest", Set({2, 0}, Str(Printable(257)))),
       kInvalid,
       "RankInfoRequest.sender.instance: length out of range: bytes=257 min=1 max=256"},
      {"instance with a newline", Edited("RankInfoRequest", Set({2, 0}, Str("ctx\n0"))),
       kInvalid, "RankInfoRequest.sender.instance: not printable: offset=3 byte=10"},
      {"control address with DEL",
       Edited("RankInfoReply", Set({2, 3}, Str("tcp://\x7f"))), kInvalid,
       "RankInfoReply.sender.control_address: not printable: offset=6 byte=127"},
      {"control address with a high byte",
       Edited("RankInfoReply", Set({2, 3}, Str("\xc3\xa9"))), kInvalid,
       "RankInfoReply.sender.control_address: not printable: offset=0 byte=195"},
      {"empty control address", Edited("RankInfoReply", Set({2, 3}, Str(""))), kInvalid,
       "RankInfoReply.sender.control_address: length out of range: bytes=0 min=1 "
       "max=256"},
      {"empty transport address", Edited("RankInfoRequest", Set({2, 4}, Bin(""))),
       kInvalid,
       "RankInfoRequest.sender.transport_address: length out of range: bytes=0 min=1 "
       "max=4096"},
      {"transport address past any bin bound",
       Edited("RankInfoRequest", Set({2, 4}, Bin(AllBytes(4097)))), kInvalid,
       "RankInfoRequest: bin longer than any field admits: max_bytes=4096"},
      {"reason one past its bound",
       Edited("SliceResult", Set({8}, Str(Printable(kMaxReasonBytes + 1)))), kInvalid,
       "SliceResult: str longer than any field admits: max_bytes=1024"},
      {"cancel reason far past its bound",
       Edited("Cancel", Set({5}, Str(Printable(100000)))), kInvalid,
       "Cancel: str longer than any field admits: max_bytes=1024"},
  });
}

TEST(Protocol, RejectsResultsWhoseCodeContradictsTheOutcome) {
  // SliceResult fields: 5 outcome (1 success, 2 failed), 7 code.
  ExpectRejections({
      {"failed with OK", Edited("SliceResult", Set({7}, Uint(0))), kInvalid,
       "SliceResult.code: status code does not fit the outcome: code=0 outcome=2 min=1 "
       "max=16"},
      {"failed with an unknown code", Edited("SliceResult", Set({7}, Uint(17))), kInvalid,
       "SliceResult.code: status code does not fit the outcome: code=17 outcome=2 min=1 "
       "max=16"},
      {"failed with a negative code", Edited("SliceResult", Set({7}, Int(-1))), kInvalid,
       "SliceResult.code: status code does not fit the outcome: code=-1 outcome=2 min=1 "
       "max=16"},
      {"success with an error code",
       Edited("SliceResult",
              [](Node& root) {
                At(root, {5}) = Uint(1);
                At(root, {7}) = Uint(2);
              }),
       kInvalid,
       "SliceResult.code: status code does not fit the outcome: code=2 outcome=1 min=0 "
       "max=0"},
  });
}

TEST(Protocol, RejectsPageTablesThatFailValidation) {
  // RankInfo fields: 2 rank, 5 page_table; page table: 4 tokens_per_block,
  // 7 num_kv_heads, 9 topology.
  EXPECT_THAT(
      DecodeMessage(Edited("RankInfoRequest", Set({2, 5, 4}, Uint(0)))),
      StatusIs(kInvalid,
               StartsWith("RankInfoRequest.sender.page_table: tokens_per_block ")));
  EXPECT_THAT(DecodeMessage(Edited("RankInfoReply", Set({2, 5, 0, 1, 0}, Uint(1 << 20)))),
              StatusIs(kInvalid, StartsWith("RankInfoReply.sender.page_table: ")));
  // An unsupported head split keeps ValidatePageTable's own code.
  EXPECT_THAT(DecodeMessage(Edited("RankInfoRequest", Set({2, 5, 7}, Uint(3)))),
              StatusIs(absl::StatusCode::kUnimplemented,
                       StartsWith("RankInfoRequest.sender.page_table: ")));
  EXPECT_THAT(DecodeMessage(Edited("RankInfoRequest", Set({2, 2}, Uint(2)))),
              StatusIs(kInvalid,
                       "RankInfoRequest.sender.rank: rank does not match its topology: "
                       "rank=2 tp_size=4 tp_rank=1 pp_rank=2"));
}

TEST(Protocol, BoundsTheRanksOfAValidTopology) {
  // Every field is valid and the head split works, but the instance has 3 x 2^62
  // ranks: a loop over them would never end, and pp_rank * tp_size overflows.
  RankInfoRequest request{ValidRankInfo()};
  RankPageTable& table = request.sender.page_table = MinimalTable();
  table.num_kv_heads = 4;
  table.topology =
      MakeTopology(int64_t{1} << 62, {1, 1, 1}, /*tp_rank=*/1, /*pp_rank=*/2);
  // ValidatePageTable bounds an instance's ranks too (issue 8); the decoder's own
  // bound comes first and names the field.
  ASSERT_THAT(ValidatePageTable(table), Not(IsOk()));
  request.sender.rank = 5;
  const std::string bytes = EncodeMessage(request);
  EXPECT_THAT(DecodeMessage(bytes),
              StatusIs(kExhausted,
                       "RankInfoRequest.sender.page_table.topology: too many "
                       "ranks: tp_size=4611686018427387904 pp_size=3 "
                       "max_ranks=65536"));
  // Even without a bound on ranks the product is refused, not overflowed.
  DecodeLimits limits;
  limits.max_ranks = std::numeric_limits<size_t>::max();
  EXPECT_THAT(DecodeMessage(bytes, limits),
              StatusIs(kExhausted, HasSubstr("too many ranks: tp_size=4611686018427387904 "
                                             "pp_size=3 max_ranks=18446744073709551615")));
  // 2^62 ranks fit in the product: the page table's own bound (kMaxInstanceRanks)
  // refuses them.
  table.topology = MakeTopology(int64_t{1} << 62, {1}, /*tp_rank=*/1);
  EXPECT_THAT(DecodeMessage(EncodeMessage(request), limits),
              StatusIs(kInvalid, HasSubstr("too many ranks")));
}

TEST(Protocol, RejectsGrantsThatAreNotOnePerPool) {
  RankInfoReply reply = std::get<RankInfoReply>(Typical("RankInfoReply"));
  reply.grants.pop_back();
  EXPECT_THAT(DecodeMessage(EncodeMessage(reply)),
              StatusIs(kInvalid,
                       "RankInfoReply.grants: one grant per pool or none: "
                       "grants=1 pools=2"));
}

// The records of each typical message by path, with their field counts: every
// field of every record, dropped in turn, is named as missing.
struct RecordPath {
  std::string kind;
  std::vector<size_t> path;
  std::string name;  // the path as errors print it
};

std::vector<RecordPath> RecordPaths() {
  std::vector<RecordPath> paths = {
      {"RequestData", {}, "RequestData"},
      {"SliceResult", {}, "SliceResult"},
      {"AuxTokens", {}, "AuxTokens"},
      {"Cancel", {}, "Cancel"},
      {"RankInfoRequest", {}, "RankInfoRequest"},
      {"RankInfoReply", {}, "RankInfoReply"},
      {"RankInfoReply", {4, 1}, "RankInfoReply.grants[1]"},
  };
  const std::vector<std::pair<std::vector<size_t>, std::string>> rank_info = {
      {{2}, "sender"},
      {{2, 5}, "sender.page_table"},
      {{2, 5, 0, 1}, "sender.page_table.pools[1]"},
      {{2, 5, 1, 0}, "sender.page_table.attention_groups[0]"},
      {{2, 5, 1, 0, 3}, "sender.page_table.attention_groups[0].view"},
      {{2, 5, 1, 0, 3, 1, 1}, "sender.page_table.attention_groups[0].view.layers[1]"},
      {{2, 5, 2, 0}, "sender.page_table.state_groups[0]"},
      {{2, 5, 2, 0, 2, 0}, "sender.page_table.state_groups[0].layers[0]"},
      {{2, 5, 9}, "sender.page_table.topology"},
  };
  for (const auto& [path, name] : rank_info) {
    paths.push_back({"RankInfoRequest", path, "RankInfoRequest." + name});
  }
  return paths;
}

TEST(Protocol, EveryFieldOfEveryRecordIsRequired) {
  for (const RecordPath& record : RecordPaths()) {
    SCOPED_TRACE(record.name);
    const Node root = Parse(EncodeMessage(Typical(record.kind)));
    Node whole = root;
    const size_t fields = At(whole, record.path).items.size();
    // Messages need their kind and version before their fields are known.
    for (size_t n = record.path.empty() ? 2 : 0; n < fields; ++n) {
      SCOPED_TRACE(absl::StrCat("fields=", n));
      Node edited = root;
      At(edited, record.path).items.resize(n);
      absl::StatusOr<Message> decoded = DecodeMessage(Serialize(edited));
      EXPECT_THAT(decoded,
                  StatusIs(kInvalid, HasSubstr(absl::StrCat(": missing field: fields=", n,
                                                            " expected=", fields))));
      EXPECT_THAT(decoded, StatusIs(kInvalid, StartsWith(record.name + ".")));
    }
    Node extra = root;
    At(extra, record.path).items.push_back(Nil());
    EXPECT_THAT(
        DecodeMessage(Serialize(extra)),
        StatusIs(kInvalid, absl::StrCat(record.name, ": unexpected fields: fields=",
                                        fields + 1, " expected=", fields)));
  }
}

// Visits every value of `root` with its path.
void ForEachPath(const Node& node, std::vector<size_t>* path,
                 const std::function<void(const std::vector<size_t>&)>& visit) {
  visit(*path);
  for (size_t i = 0; i < node.items.size(); ++i) {
    path->push_back(i);
    ForEachPath(node.items[i], path, visit);
    path->pop_back();
  }
}

TEST(Protocol, EveryValueOfTheWrongTypeIsRefused) {
  // No field of the format is a float, so a float anywhere is the wrong type.
  for (const Named& named : TypicalMessages()) {
    SCOPED_TRACE(named.name);
    const Node root = Parse(EncodeMessage(named.message));
    std::vector<size_t> path;
    ForEachPath(root, &path, [&](const std::vector<size_t>& p) {
      SCOPED_TRACE(::testing::PrintToString(p));
      Node edited = root;
      At(edited, p) = Float(0.5);
      // Until the kind is read, errors name the message "message".
      const bool before_kind = p.empty() || p == std::vector<size_t>{0};
      const std::string prefix = before_kind ? "" : named.name + ".";
      EXPECT_THAT(
          DecodeMessage(Serialize(edited)),
          StatusIs(kInvalid, ::testing::AllOf(StartsWith(prefix),
                                              HasSubstr(": wrong type: expected="),
                                              HasSubstr(" got=float64"))));
    });
  }
}

// ---------------------------------------------------------------------------
// Limits.

TEST(Protocol, EnforcesDecodeLimits) {
  struct Case {
    std::string name;
    Message message;
    std::function<void(DecodeLimits&, size_t at_limit)> set;  // the limit just fits
    size_t at_limit;
    std::string message_over;  // with the limit one lower
  };
  RequestData data = std::get<RequestData>(Typical("RequestData"));  // 18 + 2 + 0 + 5 ids
  RankInfoReply reply = std::get<RankInfoReply>(Typical("RankInfoReply"));
  // ValidTable's layer entries: ids 2 + buffers 2 (full group), state ids 1 +
  // buffers 1, layers_per_pp_rank 3.
  const Case cases[] = {
      {"block ids", data, [](DecodeLimits& l, size_t n) { l.max_block_ids = n; }, 25,
       "RequestData.block_ids_per_group[3]: too many block ids: total=25 "
       "max_block_ids=24"},
      {"request lists", data, [](DecodeLimits& l, size_t n) { l.max_groups = n; }, 4,
       "RequestData.block_ids_per_group: too many groups: total=4 max_groups=3"},
      {"slice groups", reply, [](DecodeLimits& l, size_t n) { l.max_groups = n; }, 3,
       "RankInfoReply.sender.page_table.slice_groups: too many groups: total=3 "
       "max_groups=2"},
      {"pools", reply, [](DecodeLimits& l, size_t n) { l.max_pools = n; }, 2,
       "RankInfoReply.sender.page_table.pools: too many pools: total=2 max_pools=1"},
      {"layer entries", reply, [](DecodeLimits& l, size_t n) { l.max_layers = n; }, 9,
       "RankInfoReply.sender.page_table.topology.layers_per_pp_rank: too many layer "
       "entries: total=9 max_layers=8"},
      {"ranks (TP4 x PP3)", reply, [](DecodeLimits& l, size_t n) { l.max_ranks = n; }, 12,
       "RankInfoReply.sender.page_table.topology: too many ranks: tp_size=4 pp_size=3 "
       "max_ranks=11"},
      {"aux tokens", Typical("AuxTokens"),
       [](DecodeLimits& l, size_t n) { l.max_aux_tokens = n; }, 3,
       "AuxTokens.tokens: too many tokens: total=3 max_aux_tokens=2"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string bytes = EncodeMessage(c.message);
    DecodeLimits limits;
    c.set(limits, c.at_limit);
    EXPECT_THAT(DecodeMessage(bytes, limits), IsOk());
    c.set(limits, c.at_limit - 1);
    EXPECT_THAT(DecodeMessage(bytes, limits), StatusIs(kExhausted, c.message_over));
  }
}

TEST(Protocol, GrantsCountAgainstMaxPools) {
  RankInfoReply reply = std::get<RankInfoReply>(Typical("RankInfoReply"));  // 2 pools
  reply.grants.push_back(PoolGrant{});
  const std::string bytes = EncodeMessage(reply);
  DecodeLimits limits;
  limits.max_pools = 3;  // within the bound, but not one grant per pool
  EXPECT_THAT(DecodeMessage(bytes, limits),
              StatusIs(kInvalid, HasSubstr("one grant per pool")));
  limits.max_pools = 2;
  EXPECT_THAT(
      DecodeMessage(bytes, limits),
      StatusIs(kExhausted, "RankInfoReply.grants: too many grants: total=3 max_pools=2"));
}

TEST(Protocol, BoundsTheWholeMessageBeforeUnpackingIt) {
  // Each list below is within max_block_ids, but together they hold more than any
  // message within the limits (the largest: a RequestData of 15 fields, 1 list and
  // 100 ids): refused before msgpack allocates them.
  DecodeLimits limits;
  limits.max_block_ids = 100;
  limits.max_groups = 1;
  limits.max_pools = 0;
  limits.max_layers = 0;
  limits.max_aux_tokens = 0;
  limits.max_staged_fragments = 0;
  RequestData data;
  data.block_ids_per_group.assign(2, BlockList(60, 1));
  EXPECT_THAT(DecodeMessage(EncodeMessage(data), limits),
              StatusIs(kExhausted,
                       "RequestData: more elements than any message within "
                       "the limits: elements=137 max_elements=116"));
  data.block_ids_per_group = {BlockList(100, 1)};
  EXPECT_THAT(DecodeMessage(EncodeMessage(data), limits), IsOk());
}

TEST(Protocol, EnforcesMessageSize) {
  const std::string bytes = EncodeMessage(Typical("RequestData"));
  DecodeLimits limits;
  limits.max_message_bytes = bytes.size();
  EXPECT_THAT(DecodeMessage(bytes, limits), IsOk());
  limits.max_message_bytes = bytes.size() - 1;
  EXPECT_THAT(
      DecodeMessage(bytes, limits),
      StatusIs(kExhausted,
               absl::StrCat("RequestData: message too large: bytes=", bytes.size(),
                            " max_message_bytes=", bytes.size() - 1)));
}

TEST(Protocol, ZeroListLimitsStillDecodeRecordsAndEmptyLists) {
  DecodeLimits limits;
  limits.max_block_ids = 0;
  limits.max_groups = 0;
  limits.max_pools = 0;
  limits.max_layers = 0;
  limits.max_aux_tokens = 0;
  RequestData data = std::get<RequestData>(Typical("RequestData"));
  data.block_ids_per_group.clear();
  EXPECT_THAT(DecodeMessage(EncodeMessage(data), limits), IsOk());
  // A list longer than every limit and than any record stops in msgpack itself.
  AuxTokens aux{1, 2, std::nullopt, std::vector<int64_t>(20, 1)};
  EXPECT_THAT(DecodeMessage(EncodeMessage(aux), limits),
              StatusIs(kExhausted, "AuxTokens: list over limit: max_entries=0"));
}

// ---------------------------------------------------------------------------
// Malformed bytes.

TEST(Protocol, RejectsTruncationAtEveryOffset) {
  for (const Named& named : TypicalMessages()) {
    SCOPED_TRACE(named.name);
    const std::string bytes = EncodeMessage(named.message);
    // Size 0 is the empty message (RejectsMalformedAndHostileMsgpack).
    for (size_t size = 1; size < bytes.size(); ++size) {
      SCOPED_TRACE(absl::StrCat("size=", size));
      // A short prefix already declares more elements than it holds bytes; a
      // longer one runs out inside a value.
      EXPECT_THAT(
          DecodeMessage(absl::string_view(bytes).substr(0, size)),
          StatusIs(kInvalid, ::testing::AnyOf(HasSubstr(": truncated: bytes="),
                                              HasSubstr(": declares more elements"))));
    }
  }
}

TEST(Protocol, RejectsTrailingBytes) {
  for (const Named& named : TypicalMessages()) {
    SCOPED_TRACE(named.name);
    const std::string bytes = EncodeMessage(named.message);
    for (const std::string& tail : {std::string(1, '\0'), std::string("\xc0"), bytes}) {
      EXPECT_THAT(
          DecodeMessage(bytes + tail),
          StatusIs(kInvalid,
                   absl::StrCat(named.name, ": trailing bytes after the message: parsed=",
                                bytes.size(), " bytes=", bytes.size() + tail.size())));
    }
  }
}

TEST(Protocol, RejectsMalformedAndHostileMsgpack) {
  Node deep = Uint(1);
  for (int i = 0; i < 9; ++i) deep = Array({deep});
  ExpectRejections({
      {"empty", "", kInvalid, "message: empty message"},
      {"reserved byte", "\xc1", kInvalid, "message: malformed msgpack: offset=0"},
      {"reserved byte inside", std::string("\x93\x03\x01\xc1", 4), kInvalid,
       "RequestData: malformed msgpack: offset=3"},
      // An array32 header declaring 4M elements: refused before msgpack allocates them.
      {"array declaring more elements than bytes", std::string("\xdd\x00\x40\x00\x00", 5),
       kInvalid, "message: declares more elements than it has bytes: bytes=5"},
      {"a block list of lists",
       Edited("RequestData", Set({9, 0}, Array(std::vector<Node>(3, Array({}))))),
       kInvalid,
       "RequestData.block_ids_per_group[0][0]: wrong type: expected=int got=array"},
      {"nested too deep", Serialize(deep), kInvalid,
       "message: nested too deep: max_depth=8"},
      {"a map with entries",
       Edited("RequestData",
              [](Node& root) {
                Node map;
                map.type = msgpack::type::MAP;
                map.items = {Uint(1), Uint(2)};
                At(root, {9}) = map;
              }),
       kInvalid,
       "RequestData: msgpack value the format does not have: error=map size overflow"},
      {"an extension",
       Edited("RequestData",
              [](Node& root) {
                Node ext;
                ext.type = msgpack::type::EXT;
                ext.ext_type = 1;
                ext.bytes = "x";
                At(root, {2}) = ext;
              }),
       kInvalid,
       "RequestData: msgpack value the format does not have: error=ext size overflow"},
  });
  // A list header inside a valid message that claims far more ids than follow.
  std::string bytes = EncodeMessage(RequestData{});
  // RequestData{}: fixarray(15) kind version 0 0 0 0 0 0 false [] nil nil nil 0 0;
  // byte 10 is the empty list: make it array32 of 2^31 elements.
  ASSERT_EQ(static_cast<uint8_t>(bytes[10]), 0x90);
  bytes = bytes.substr(0, 10) + std::string("\xdd\x80\x00\x00\x00", 5) + bytes.substr(11);
  EXPECT_THAT(
      DecodeMessage(bytes),
      StatusIs(kInvalid, absl::StrCat("RequestData: declares more elements than it "
                                      "has bytes: bytes=",
                                      bytes.size())));
}

// ---------------------------------------------------------------------------
// Mutations of valid encodings: no crash, no exception, and either an error or
// a message that re-encodes to a decodable, stable value.

TEST(Protocol, MutatedMessagesFailCleanlyOrStayDecodable) {
  const uint32_t seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE(
      absl::StrCat("seed=", seed, " (replay with --gtest_random_seed=", seed, ")"));
  std::mt19937_64 random(seed);
  std::vector<std::string> valid;
  for (const Named& named : TypicalMessages())
    valid.push_back(EncodeMessage(named.message));
  // Interesting bytes: msgpack type markers at their edges, and small values.
  const uint8_t kMarkers[] = {0x00, 0x01, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf,
                              0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc7, 0xca, 0xcb, 0xcc,
                              0xcf, 0xd0, 0xd3, 0xd4, 0xd9, 0xdc, 0xdd, 0xde, 0xff};
  const auto random_byte = [&]() -> char {
    if (random() % 2 == 0)
      return static_cast<char>(kMarkers[random() % std::size(kMarkers)]);
    return static_cast<char>(random() % 256);
  };
  constexpr int kCases = 20000;
  int decoded_ok = 0;
  for (int c = 0; c < kCases; ++c) {
    std::string bytes = valid[random() % valid.size()];
    const int mutations = 1 + static_cast<int>(random() % 3);
    for (int m = 0; m < mutations && !bytes.empty(); ++m) {
      const size_t at = random() % bytes.size();
      switch (random() % 5) {
        case 0:
          bytes[at] = static_cast<char>(bytes[at] ^ (1 << (random() % 8)));
          break;
        case 1:
          bytes[at] = random_byte();
          break;
        case 2:
          bytes.insert(bytes.begin() + at, random_byte());
          break;
        case 3:
          bytes.erase(at, 1 + random() % 4);
          break;
        case 4:
          bytes.insert(at, bytes.substr(at, 1 + random() % 8));
          break;
      }
    }
    absl::StatusOr<Message> decoded = DecodeMessage(bytes);
    if (!decoded.ok()) {
      // Peer input is refused with one of the documented codes, never a crash.
      const absl::StatusCode code = decoded.status().code();
      ASSERT_TRUE(code == kInvalid || code == kExhausted ||
                  code == absl::StatusCode::kUnimplemented)
          << "case=" << c << " " << decoded.status();
      continue;
    }
    ++decoded_ok;
    const std::string again = EncodeMessage(*decoded);
    absl::StatusOr<Message> redecoded = DecodeMessage(again);
    ASSERT_THAT(redecoded, IsOk()) << "case=" << c;
    ASSERT_TRUE(*redecoded == *decoded) << "case=" << c;
    ASSERT_EQ(EncodeMessage(*redecoded), again) << "case=" << c;
  }
  // Some mutations (a flipped bit in an id, a changed string byte) keep the
  // message valid; the test must have exercised that branch too.
  EXPECT_GT(decoded_ok, 0);
}

}  // namespace
}  // namespace kvx::transfer
