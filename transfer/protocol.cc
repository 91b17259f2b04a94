#include "transfer/protocol.h"

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "msgpack.hpp"
#include "transfer/page_table.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

// The wire kind of a message is its index in `Message` plus one (0 is never a kind).
// These pin the order, so reordering the variant cannot renumber the wire.
static_assert(std::is_same_v<std::variant_alternative_t<0, Message>, RankInfoRequest>);
static_assert(std::is_same_v<std::variant_alternative_t<1, Message>, RankInfoReply>);
static_assert(std::is_same_v<std::variant_alternative_t<2, Message>, RequestData>);
static_assert(std::is_same_v<std::variant_alternative_t<3, Message>, SliceResult>);
static_assert(std::is_same_v<std::variant_alternative_t<4, Message>, AuxTokens>);
static_assert(std::is_same_v<std::variant_alternative_t<5, Message>, Cancel>);
static_assert(std::is_same_v<std::variant_alternative_t<6, Message>, StagedChunk>);
static_assert(std::is_same_v<std::variant_alternative_t<7, Message>, StagingCredit>);
static_assert(std::variant_size_v<Message> == 8);

// Fixed limits of the format (PROTOCOL.md); DecodeLimits holds the tunable ones.
constexpr size_t kMaxNameBytes = 256;  // RankInfo::instance and control_address
constexpr size_t kMaxTransportAddressBytes = 4096;
// The deepest message is a RankInfoReply: message > sender > page_table >
// attention_groups > group > view > layers > LayerBuffers.
constexpr size_t kMaxDepth = 8;

// Positional field names, in wire order. They name fields in errors, and their
// count is each record's array length on the wire: encoder and decoder both use it.
using Fields = absl::Span<const char* const>;
constexpr const char* kRankInfoRequestFields[] = {"kind", "version", "sender"};
constexpr const char* kRankInfoReplyFields[] = {"kind",        "version", "sender",
                                                "grant_epoch", "grants",  "staging"};
constexpr const char* kRequestDataFields[] = {"kind",
                                              "version",
                                              "unique_rid",
                                              "slice_id",
                                              "receiver_rank",
                                              "prompt_len",
                                              "token_start",
                                              "token_end",
                                              "is_last_slice",
                                              "block_ids_per_group",
                                              "dst_start_token",
                                              "aux_slot",
                                              "state_slot",
                                              "dp_rank",
                                              "grant_epoch"};
constexpr const char* kSliceResultFields[] = {
    "kind",          "version", "unique_rid", "slice_id", "sender_rank", "outcome",
    "is_last_slice", "code",    "reason",     "settled",  "bytes",       "writes",
    "staged_chunks"};
constexpr const char* kAuxTokensFields[] = {"kind",        "version",  "unique_rid",
                                            "sender_rank", "aux_slot", "tokens"};
constexpr const char* kCancelFields[] = {"kind",        "version", "unique_rid",
                                         "sender_rank", "from",    "reason"};
constexpr const char* kStagedChunkFields[] = {"kind",        "version", "unique_rid",
                                              "slice_id",    "sender_rank", "slot",
                                              "seq",         "fragments"};
constexpr const char* kStagingCreditFields[] = {"kind", "version", "receiver_rank", "slot",
                                                "seq"};
constexpr const char* kStagingGrantFields[] = {"region", "slot_bytes", "slots"};
constexpr const char* kStagedFragmentFields[] = {"pool", "offset", "bytes"};
constexpr const char* kRankInfoFields[] = {
    "instance", "role", "rank", "control_address", "transport_address", "page_table"};
constexpr const char* kPoolGrantFields[] = {"address", "length", "key"};
constexpr const char* kPageTableFields[] = {
    "pools",     "attention_groups", "state_groups", "slice_groups", "tokens_per_block",
    "head_size", "element_bytes",    "num_kv_heads", "is_mla",       "topology"};
constexpr const char* kPoolFields[] = {"base_address", "slot_bytes", "num_slots", "role"};
constexpr const char* kAttentionGroupFields[] = {"window", "kv_heads_per_rank",
                                                 "global_layer_ids", "view"};
constexpr const char* kPoolViewFields[] = {"pool_index", "layers"};
constexpr const char* kLayerBuffersFields[] = {"k_offset", "v_offset"};
constexpr const char* kStateGroupFields[] = {"global_layer_ids", "pool_index", "layers"};
constexpr const char* kStateBufferFields[] = {"offset", "bytes"};
constexpr const char* kTopologyFields[] = {
    "tp_size", "tp_rank", "pp_size", "pp_rank", "layers_per_pp_rank", "attention_dp"};
constexpr size_t kMaxRecordFields =
    std::max({std::size(kRankInfoRequestFields), std::size(kRankInfoReplyFields),
              std::size(kRequestDataFields), std::size(kSliceResultFields),
              std::size(kAuxTokensFields), std::size(kCancelFields),
              std::size(kStagedChunkFields), std::size(kStagingCreditFields),
              std::size(kRankInfoFields), std::size(kPageTableFields)});

// PoolRole has no wire values of its own; these are.
constexpr uint8_t kPoolRoleKVCache = 1;
constexpr uint8_t kPoolRoleMambaState = 2;

// ---------------------------------------------------------------------------
// Encoding.

// The output stream msgpack::packer writes to.
// Grows by doubling and copies small writes inline: the packer writes each value
// as 1 to 9 bytes, and an out-of-line call per value (std::string::append, or
// memcpy of a variable size) was most of the encoding time.
class StringWriter {
 public:
  void write(const char* data, size_t size) {
    if (size == 0) return;  // msgpack passes null data for empty bodies
    if (size > buffer_.size() - used_) {
      buffer_.resize(std::max(2 * buffer_.size(), used_ + size));
    }
    char* out = &buffer_[used_];
    if (size <= 16) {
      for (size_t i = 0; i < size; ++i) out[i] = data[i];
    } else {
      std::memcpy(out, data, size);
    }
    used_ += size;
  }

  std::string Take() && {
    buffer_.resize(used_);
    return std::move(buffer_);
  }

 private:
  std::string buffer_ = std::string(64, '\0');
  size_t used_ = 0;
};

using Packer = msgpack::packer<StringWriter>;

void PackRecordHeader(Packer& p, Fields fields) {
  p.pack_array(static_cast<uint32_t>(fields.size()));
}

void PackMessageHeader(Packer& p, const Message& message, Fields fields) {
  PackRecordHeader(p, fields);
  p.pack_uint8(static_cast<uint8_t>(message.index() + 1));
  p.pack_uint8(kProtocolVersion);
}

void PackStr(Packer& p, absl::string_view s) {
  p.pack_str(static_cast<uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

void PackBin(Packer& p, absl::string_view s) {
  p.pack_bin(static_cast<uint32_t>(s.size()));
  p.pack_bin_body(s.data(), static_cast<uint32_t>(s.size()));
}

// Free text: cut to the bound rather than make the whole message undecodable (a
// FAILED result whose long reason got it dropped would leave the peer waiting).
void PackReason(Packer& p, const std::string& reason) {
  PackStr(p, absl::string_view(reason).substr(0, kMaxReasonBytes));
}

void PackOptional(Packer& p, const std::optional<int64_t>& value) {
  if (value.has_value()) {
    p.pack_int64(*value);
  } else {
    p.pack_nil();
  }
}

void PackInts(Packer& p, const std::vector<int64_t>& values) {
  p.pack_array(static_cast<uint32_t>(values.size()));
  for (int64_t v : values) p.pack_int64(v);
}

void PackTopology(Packer& p, const Topology& t) {
  PackRecordHeader(p, kTopologyFields);
  p.pack_int64(t.tp_size);
  p.pack_int64(t.tp_rank);
  p.pack_int64(t.pp_size);
  p.pack_int64(t.pp_rank);
  PackInts(p, t.layers_per_pp_rank);
  p.pack(t.attention_dp);
}

void PackPageTable(Packer& p, const RankPageTable& table) {
  PackRecordHeader(p, kPageTableFields);
  p.pack_array(static_cast<uint32_t>(table.pools.size()));
  for (const Pool& pool : table.pools) {
    PackRecordHeader(p, kPoolFields);
    p.pack_uint64(pool.base_address);
    p.pack_uint64(pool.slot_bytes);
    p.pack_int64(pool.num_slots);
    p.pack_uint8(pool.role == PoolRole::kKVCache ? kPoolRoleKVCache
                                                 : kPoolRoleMambaState);
  }
  p.pack_array(static_cast<uint32_t>(table.attention_groups.size()));
  for (const AttentionGroup& group : table.attention_groups) {
    PackRecordHeader(p, kAttentionGroupFields);
    PackOptional(p, group.window);
    p.pack_int64(group.kv_heads_per_rank);
    PackInts(p, group.global_layer_ids);
    PackRecordHeader(p, kPoolViewFields);
    p.pack_int64(group.view.pool_index);
    p.pack_array(static_cast<uint32_t>(group.view.layers.size()));
    for (const LayerBuffers& layer : group.view.layers) {
      PackRecordHeader(p, kLayerBuffersFields);
      p.pack_uint64(layer.k_offset);
      p.pack_uint64(layer.v_offset);
    }
  }
  p.pack_array(static_cast<uint32_t>(table.state_groups.size()));
  for (const StateGroup& group : table.state_groups) {
    PackRecordHeader(p, kStateGroupFields);
    PackInts(p, group.global_layer_ids);
    p.pack_int64(group.pool_index);
    p.pack_array(static_cast<uint32_t>(group.layers.size()));
    for (const StateBuffer& layer : group.layers) {
      PackRecordHeader(p, kStateBufferFields);
      p.pack_uint64(layer.offset);
      p.pack_uint64(layer.bytes);
    }
  }
  PackInts(p, table.slice_groups);
  p.pack_int64(table.tokens_per_block);
  p.pack_int64(table.head_size);
  p.pack_int64(table.element_bytes);
  p.pack_int64(table.num_kv_heads);
  p.pack(table.is_mla);
  PackTopology(p, table.topology);
}

void PackRankInfo(Packer& p, const RankInfo& info) {
  PackRecordHeader(p, kRankInfoFields);
  PackStr(p, info.instance);
  p.pack_uint8(static_cast<uint8_t>(info.role));
  p.pack_int64(info.rank);
  PackStr(p, info.control_address);
  PackBin(p, info.transport_address);
  PackPageTable(p, info.page_table);
}

void Pack(Packer& p, const Message& m, const RankInfoRequest& r) {
  PackMessageHeader(p, m, kRankInfoRequestFields);
  PackRankInfo(p, r.sender);
}

void PackPoolGrant(Packer& p, const PoolGrant& grant) {
  PackRecordHeader(p, kPoolGrantFields);
  p.pack_uint64(grant.address);
  p.pack_uint64(grant.length);
  p.pack_uint64(grant.key);
}

void Pack(Packer& p, const Message& m, const RankInfoReply& r) {
  PackMessageHeader(p, m, kRankInfoReplyFields);
  PackRankInfo(p, r.sender);
  p.pack_uint64(r.grant_epoch);
  p.pack_array(static_cast<uint32_t>(r.grants.size()));
  for (const PoolGrant& grant : r.grants) PackPoolGrant(p, grant);
  if (r.staging.has_value()) {
    PackRecordHeader(p, kStagingGrantFields);
    PackPoolGrant(p, r.staging->region);
    p.pack_uint64(r.staging->slot_bytes);
    p.pack_uint32(r.staging->slots);
  } else {
    p.pack_nil();
  }
}

void Pack(Packer& p, const Message& m, const RequestData& r) {
  PackMessageHeader(p, m, kRequestDataFields);
  p.pack_uint64(r.unique_rid);
  p.pack_int64(r.slice_id);
  p.pack_int64(r.receiver_rank);
  p.pack_int64(r.prompt_len);
  p.pack_int64(r.token_start);
  p.pack_int64(r.token_end);
  p.pack(r.is_last_slice);
  p.pack_array(static_cast<uint32_t>(r.block_ids_per_group.size()));
  for (const BlockList& list : r.block_ids_per_group) PackInts(p, list);
  PackOptional(p, r.dst_start_token);
  PackOptional(p, r.aux_slot);
  PackOptional(p, r.state_slot);
  p.pack_int64(r.dp_rank);
  p.pack_uint64(r.grant_epoch);
}

void Pack(Packer& p, const Message& m, const SliceResult& r) {
  PackMessageHeader(p, m, kSliceResultFields);
  p.pack_uint64(r.unique_rid);
  p.pack_int64(r.slice_id);
  p.pack_int64(r.sender_rank);
  p.pack_uint8(static_cast<uint8_t>(r.outcome));
  p.pack(r.is_last_slice);
  p.pack_int32(r.code);
  PackReason(p, r.reason);
  p.pack(r.settled);
  p.pack_uint64(r.bytes);
  p.pack_int64(r.writes);
  p.pack_int64(r.staged_chunks);
}

void Pack(Packer& p, const Message& m, const AuxTokens& r) {
  PackMessageHeader(p, m, kAuxTokensFields);
  p.pack_uint64(r.unique_rid);
  p.pack_int64(r.sender_rank);
  PackOptional(p, r.aux_slot);
  PackInts(p, r.tokens);
}

void Pack(Packer& p, const Message& m, const Cancel& r) {
  PackMessageHeader(p, m, kCancelFields);
  p.pack_uint64(r.unique_rid);
  p.pack_int64(r.sender_rank);
  p.pack_uint8(static_cast<uint8_t>(r.from));
  PackReason(p, r.reason);
}

void Pack(Packer& p, const Message& m, const StagedChunk& r) {
  PackMessageHeader(p, m, kStagedChunkFields);
  p.pack_uint64(r.unique_rid);
  p.pack_int64(r.slice_id);
  p.pack_int64(r.sender_rank);
  p.pack_uint32(r.slot);
  p.pack_uint64(r.seq);
  p.pack_array(static_cast<uint32_t>(r.fragments.size()));
  for (const StagedFragment& f : r.fragments) {
    PackRecordHeader(p, kStagedFragmentFields);
    p.pack_int64(f.pool);
    p.pack_uint64(f.offset);
    p.pack_uint64(f.bytes);
  }
}

void Pack(Packer& p, const Message& m, const StagingCredit& r) {
  PackMessageHeader(p, m, kStagingCreditFields);
  p.pack_int64(r.receiver_rank);
  p.pack_uint32(r.slot);
  p.pack_uint64(r.seq);
}

// ---------------------------------------------------------------------------
// Decoding.

// Where a value sits in the message, rendered only for an error
// ("RequestData.block_ids_per_group[3][17]"). Each node lives on the stack of the
// code decoding its parent, so a child's `parent` pointer outlives the child.
struct Path {
  const Path* parent = nullptr;
  absl::string_view field;  // empty: a list element, named by `index`
  size_t index = 0;
};

void AppendPath(const Path& path, std::string* out) {
  if (path.parent != nullptr) AppendPath(*path.parent, out);
  if (!path.field.empty()) {
    if (path.parent != nullptr) out->push_back('.');
    out->append(path.field.data(), path.field.size());
  } else {
    absl::StrAppend(out, "[", path.index, "]");
  }
}

// One value to decode; `object` is null once decoding has failed, which makes
// every reader below a no-op, so decoding code reads straight through.
struct Value {
  const msgpack::object* object = nullptr;
  Path path;
};

const char* TypeName(msgpack::type::object_type type) {
  switch (type) {
    case msgpack::type::NIL:
      return "nil";
    case msgpack::type::BOOLEAN:
      return "bool";
    case msgpack::type::POSITIVE_INTEGER:
      return "uint";
    case msgpack::type::NEGATIVE_INTEGER:
      return "negative int";
    case msgpack::type::FLOAT32:
      return "float32";
    case msgpack::type::FLOAT64:
      return "float64";
    case msgpack::type::STR:
      return "str";
    case msgpack::type::BIN:
      return "bin";
    case msgpack::type::ARRAY:
      return "array";
    case msgpack::type::MAP:
      return "map";
    case msgpack::type::EXT:
      return "ext";
  }
  return "unknown";
}

// Holds the first failure of one decode; later reads see !ok() and do nothing.
class Decoder {
 public:
  explicit Decoder(const DecodeLimits& limits) : limits_(limits) {}

  bool ok() const { return status_.ok(); }
  const DecodeLimits& limits() const { return limits_; }
  absl::Status status() const { return status_; }

  void Fail(absl::StatusCode code, const Path& path, absl::string_view what) {
    if (!ok()) return;
    std::string message;
    AppendPath(path, &message);
    absl::StrAppend(&message, ": ", what);
    status_ = absl::Status(code, message);
  }

  void Invalid(const Path& path, absl::string_view what) {
    Fail(absl::StatusCode::kInvalidArgument, path, what);
  }

  // Checks the type of `v`; false (and a failure) when it is another one.
  bool Expect(const Value& v, msgpack::type::object_type type, const char* expected) {
    if (v.object == nullptr || !ok()) return false;
    if (v.object->type == type) return true;
    Invalid(v.path, absl::StrCat("wrong type: expected=", expected,
                                 " got=", TypeName(v.object->type)));
    return false;
  }

 private:
  const DecodeLimits& limits_;
  absl::Status status_;
};

// Entries of one kind counted against a DecodeLimits bound, over one list or
// summed over several (block ids over a RequestData's lists).
struct Budget {
  size_t max = 0;
  const char* limit_name = "";  // the DecodeLimits field
  const char* entries = "";     // what is counted, for the message
  size_t used = 0;
};

// Reads the positional fields of one record: a msgpack array of exactly
// fields.size() elements, in order.
class Record {
 public:
  Record(Decoder* d, const Value& v, Fields fields)
      : d_(d), path_(v.path), fields_(fields) {
    if (!d_->Expect(v, msgpack::type::ARRAY, "array")) return;
    const msgpack::object_array& array = v.object->via.array;
    if (array.size < fields.size()) {
      Path missing{&path_, fields[array.size]};
      d_->Invalid(missing, absl::StrCat("missing field: fields=", array.size,
                                        " expected=", fields.size()));
      return;
    }
    if (array.size > fields.size()) {
      d_->Invalid(path_, absl::StrCat("unexpected fields: fields=", array.size,
                                      " expected=", fields.size()));
      return;
    }
    items_ = array.ptr;
  }
  Record(const Record&) = delete;
  Record& operator=(const Record&) = delete;

  // Skips fields already read by the caller (a message's kind and version).
  void Skip(size_t n) { next_ += n; }

  Value Next() {
    // Each decoding function reads exactly the fields of its table.
    assert(next_ < fields_.size());
    Value v;
    v.path = Path{&path_, fields_[next_]};
    if (items_ != nullptr && d_->ok()) v.object = &items_[next_];
    ++next_;
    return v;
  }

 private:
  Decoder* d_;
  Path path_;
  Fields fields_;
  const msgpack::object* items_ = nullptr;
  size_t next_ = 0;
};

void ReadUint64(Decoder* d, const Value& v, uint64_t* out) {
  if (d->Expect(v, msgpack::type::POSITIVE_INTEGER, "uint")) *out = v.object->via.u64;
}

// Any int64: positive or negative msgpack integers, the former up to INT64_MAX.
bool ReadInt64(Decoder* d, const Value& v, int64_t* out) {
  if (v.object == nullptr || !d->ok()) return false;
  if (v.object->type == msgpack::type::NEGATIVE_INTEGER) {
    *out = v.object->via.i64;
    return true;
  }
  if (!d->Expect(v, msgpack::type::POSITIVE_INTEGER, "int")) return false;
  if (v.object->via.u64 > static_cast<uint64_t>(INT64_MAX)) {
    d->Invalid(v.path, absl::StrCat("int out of range: value=", v.object->via.u64));
    return false;
  }
  *out = static_cast<int64_t>(v.object->via.u64);
  return true;
}

// An id or a position: an int64 >= 0. `noun` names it in the error.
void ReadId(Decoder* d, const Value& v, const char* noun, int64_t* out) {
  int64_t value = 0;
  if (!ReadInt64(d, v, &value)) return;
  if (value < 0) {
    d->Invalid(v.path, absl::StrCat("negative ", noun, ": value=", value));
    return;
  }
  *out = value;
}

// nil, or what `read` accepts.
template <typename Read>
void ReadOptional(Decoder* d, const Value& v, std::optional<int64_t>* out, Read read) {
  if (v.object == nullptr || !d->ok()) return;
  if (v.object->type == msgpack::type::NIL) {
    out->reset();
    return;
  }
  int64_t value = 0;
  read(v, &value);
  if (d->ok()) *out = value;
}

void ReadOptionalId(Decoder* d, const Value& v, const char* noun,
                    std::optional<int64_t>* out) {
  ReadOptional(d, v, out, [&](const Value& x, int64_t* o) { ReadId(d, x, noun, o); });
}

void ReadBool(Decoder* d, const Value& v, bool* out) {
  if (d->Expect(v, msgpack::type::BOOLEAN, "bool")) *out = v.object->via.boolean;
}

// A uint8 that must be one of `known` (wire values of an enum).
bool ReadEnumByte(Decoder* d, const Value& v, const char* noun,
                  std::initializer_list<uint8_t> known, uint8_t* out) {
  if (!d->Expect(v, msgpack::type::POSITIVE_INTEGER, "uint")) return false;
  const uint64_t value = v.object->via.u64;
  if (std::find(known.begin(), known.end(), value) == known.end()) {
    d->Invalid(v.path, absl::StrCat("unknown ", noun, ": value=", value));
    return false;
  }
  *out = static_cast<uint8_t>(value);
  return true;
}

void ReadRole(Decoder* d, const Value& v, Role* out) {
  uint8_t value = 0;
  if (ReadEnumByte(
          d, v, "role",
          {static_cast<uint8_t>(Role::kContext), static_cast<uint8_t>(Role::kGeneration)},
          &value)) {
    *out = static_cast<Role>(value);
  }
}

enum class Text { kAny, kPrintable };

// A msgpack str (`type` STR) or bin of min_bytes..max_bytes; kPrintable admits
// ASCII 0x20..0x7e only (names and addresses end up in logs and in ZeroMQ).
void ReadBytes(Decoder* d, const Value& v, msgpack::type::object_type type,
               size_t min_bytes, size_t max_bytes, Text text, std::string* out) {
  const bool is_str = type == msgpack::type::STR;
  if (!d->Expect(v, type, is_str ? "str" : "bin")) return;
  const char* data = is_str ? v.object->via.str.ptr : v.object->via.bin.ptr;
  const size_t size = is_str ? v.object->via.str.size : v.object->via.bin.size;
  if (size < min_bytes || size > max_bytes) {
    d->Invalid(v.path, absl::StrCat("length out of range: bytes=", size,
                                    " min=", min_bytes, " max=", max_bytes));
    return;
  }
  if (text == Text::kPrintable) {
    for (size_t i = 0; i < size; ++i) {
      const unsigned char c = static_cast<unsigned char>(data[i]);
      if (c < 0x20 || c > 0x7e) {
        d->Invalid(v.path, absl::StrCat("not printable: offset=", i,
                                        " byte=", static_cast<int>(c)));
        return;
      }
    }
  }
  out->assign(data, size);
}

// A list whose elements `read_element(element, &out[i])` decodes, charged to
// `budget`. The vector is sized from the msgpack array, whose elements are present
// in the input (DecodeMessage checks that before unpacking), so a hostile length
// cannot make it allocate more than the message's size warrants.
template <typename T, typename ReadElement>
void ReadList(Decoder* d, const Value& v, Budget* budget, std::vector<T>* out,
              ReadElement read_element) {
  if (!d->Expect(v, msgpack::type::ARRAY, "array")) return;
  const msgpack::object_array& array = v.object->via.array;
  budget->used += array.size;
  if (budget->used > budget->max) {
    d->Fail(absl::StatusCode::kResourceExhausted, v.path,
            absl::StrCat("too many ", budget->entries, ": total=", budget->used, " ",
                         budget->limit_name, "=", budget->max));
    return;
  }
  out->assign(array.size, T());
  for (size_t i = 0; i < array.size && d->ok(); ++i) {
    read_element(Value{&array.ptr[i], Path{&v.path, {}, i}}, &(*out)[i]);
  }
}

// A list of int64: ids (>= 0, `noun` naming them in errors) or, with a null noun,
// any sign (page table entries, which ValidatePageTable checks). The common
// element, a uint that fits, takes the inline path: block id lists are the bulk of
// every RequestData.
void ReadInts(Decoder* d, const Value& v, Budget* budget, const char* noun,
              std::vector<int64_t>* out) {
  ReadList(d, v, budget, out, [d, noun](const Value& x, int64_t* o) {
    if (x.object->type == msgpack::type::POSITIVE_INTEGER &&
        x.object->via.u64 <= static_cast<uint64_t>(INT64_MAX)) {
      *o = static_cast<int64_t>(x.object->via.u64);
    } else if (noun != nullptr) {
      ReadId(d, x, noun, o);
    } else {
      ReadInt64(d, x, o);
    }
  });
}

void ReadTopology(Decoder* d, const Value& v, Budget* layers, Topology* t) {
  Record r(d, v, kTopologyFields);
  ReadInt64(d, r.Next(), &t->tp_size);
  ReadInt64(d, r.Next(), &t->tp_rank);
  ReadInt64(d, r.Next(), &t->pp_size);
  ReadInt64(d, r.Next(), &t->pp_rank);
  ReadInts(d, r.Next(), layers, nullptr, &t->layers_per_pp_rank);
  ReadBool(d, r.Next(), &t->attention_dp);
}

void ReadPool(Decoder* d, const Value& v, Pool* pool) {
  Record r(d, v, kPoolFields);
  ReadUint64(d, r.Next(), &pool->base_address);
  ReadUint64(d, r.Next(), &pool->slot_bytes);
  ReadInt64(d, r.Next(), &pool->num_slots);
  uint8_t role = 0;
  if (ReadEnumByte(d, r.Next(), "pool role", {kPoolRoleKVCache, kPoolRoleMambaState},
                   &role)) {
    pool->role = role == kPoolRoleKVCache ? PoolRole::kKVCache : PoolRole::kMambaState;
  }
}

void ReadAttentionGroup(Decoder* d, const Value& v, Budget* layers,
                        AttentionGroup* group) {
  Record r(d, v, kAttentionGroupFields);
  ReadOptional(d, r.Next(), &group->window,
               [d](const Value& x, int64_t* o) { ReadInt64(d, x, o); });
  ReadInt64(d, r.Next(), &group->kv_heads_per_rank);
  ReadInts(d, r.Next(), layers, nullptr, &group->global_layer_ids);
  Record view(d, r.Next(), kPoolViewFields);
  ReadInt64(d, view.Next(), &group->view.pool_index);
  ReadList(d, view.Next(), layers, &group->view.layers,
           [d](const Value& x, LayerBuffers* buffers) {
             Record b(d, x, kLayerBuffersFields);
             ReadUint64(d, b.Next(), &buffers->k_offset);
             ReadUint64(d, b.Next(), &buffers->v_offset);
           });
}

void ReadStateGroup(Decoder* d, const Value& v, Budget* layers, StateGroup* group) {
  Record r(d, v, kStateGroupFields);
  ReadInts(d, r.Next(), layers, nullptr, &group->global_layer_ids);
  ReadInt64(d, r.Next(), &group->pool_index);
  ReadList(d, r.Next(), layers, &group->layers, [d](const Value& x, StateBuffer* buffer) {
    Record b(d, x, kStateBufferFields);
    ReadUint64(d, b.Next(), &buffer->offset);
    ReadUint64(d, b.Next(), &buffer->bytes);
  });
}

Budget GroupBudget(const Decoder& d) {
  return Budget{d.limits().max_groups, "max_groups", "groups"};
}

// Structure only; ReadRankInfo validates the table as a whole.
void ReadPageTable(Decoder* d, const Value& v, RankPageTable* table) {
  const DecodeLimits& limits = d->limits();
  // Every per-layer entry of the table counts: layer ids, buffers, PP stages.
  Budget layers{limits.max_layers, "max_layers", "layer entries"};
  Budget pools{limits.max_pools, "max_pools", "pools"};
  Budget attention_groups = GroupBudget(*d);
  Budget state_groups = GroupBudget(*d);
  Budget slice_groups = GroupBudget(*d);
  Record r(d, v, kPageTableFields);
  ReadList(d, r.Next(), &pools, &table->pools,
           [d](const Value& x, Pool* pool) { ReadPool(d, x, pool); });
  ReadList(
      d, r.Next(), &attention_groups, &table->attention_groups,
      [&](const Value& x, AttentionGroup* g) { ReadAttentionGroup(d, x, &layers, g); });
  ReadList(d, r.Next(), &state_groups, &table->state_groups,
           [&](const Value& x, StateGroup* g) { ReadStateGroup(d, x, &layers, g); });
  ReadInts(d, r.Next(), &slice_groups, nullptr, &table->slice_groups);
  ReadInt64(d, r.Next(), &table->tokens_per_block);
  ReadInt64(d, r.Next(), &table->head_size);
  ReadInt64(d, r.Next(), &table->element_bytes);
  ReadInt64(d, r.Next(), &table->num_kv_heads);
  ReadBool(d, r.Next(), &table->is_mla);
  ReadTopology(d, r.Next(), &layers, &table->topology);
}

void ReadRankInfo(Decoder* d, const Value& v, RankInfo* info) {
  Record r(d, v, kRankInfoFields);
  ReadBytes(d, r.Next(), msgpack::type::STR, 1, kMaxNameBytes, Text::kPrintable,
            &info->instance);
  ReadRole(d, r.Next(), &info->role);
  const Value rank = r.Next();
  ReadId(d, rank, "rank", &info->rank);
  ReadBytes(d, r.Next(), msgpack::type::STR, 1, kMaxNameBytes, Text::kPrintable,
            &info->control_address);
  ReadBytes(d, r.Next(), msgpack::type::BIN, 1, kMaxTransportAddressBytes, Text::kAny,
            &info->transport_address);
  const Value page_table = r.Next();
  ReadPageTable(d, page_table, &info->page_table);
  if (!d->ok()) return;

  // Whoever pairs ranks loops over every rank of the peer's instance
  // (ComputePeerOverlap): bound the instance first, by the decoder's own limit (the
  // page table's validation has a fixed one too).
  const Topology& t = info->page_table.topology;
  const size_t max_ranks = d->limits().max_ranks;
  int64_t ranks = 0;
  if (__builtin_mul_overflow(t.tp_size, t.pp_size, &ranks) ||
      static_cast<uint64_t>(ranks) > max_ranks) {
    const Path topology{&page_table.path, "topology"};
    d->Fail(absl::StatusCode::kResourceExhausted, topology,
            absl::StrCat("too many ranks: tp_size=", t.tp_size, " pp_size=", t.pp_size,
                         " max_ranks=", max_ranks));
    return;
  }
  if (absl::Status s = ValidatePageTable(info->page_table); !s.ok()) {
    d->Fail(s.code(), page_table.path, s.message());
    return;
  }

  // pp_rank * tp_size + tp_rank < ranks: no overflow.
  if (t.pp_rank * t.tp_size + t.tp_rank != info->rank) {
    d->Invalid(rank.path, absl::StrCat("rank does not match its topology: rank=",
                                       info->rank, " tp_size=", t.tp_size,
                                       " tp_rank=", t.tp_rank, " pp_rank=", t.pp_rank));
  }
}

void ReadPoolGrant(Decoder* d, const Value& v, PoolGrant* grant) {
  Record r(d, v, kPoolGrantFields);
  ReadUint64(d, r.Next(), &grant->address);
  ReadUint64(d, r.Next(), &grant->length);
  ReadUint64(d, r.Next(), &grant->key);
}

void Read(Decoder* d, Record& r, RankInfoRequest* m) {
  ReadRankInfo(d, r.Next(), &m->sender);
}

void Read(Decoder* d, Record& r, RankInfoReply* m) {
  ReadRankInfo(d, r.Next(), &m->sender);
  ReadUint64(d, r.Next(), &m->grant_epoch);
  Budget pools{d->limits().max_pools, "max_pools", "grants"};
  const Value grants = r.Next();
  ReadList(d, grants, &pools, &m->grants,
           [d](const Value& x, PoolGrant* g) { ReadPoolGrant(d, x, g); });
  const size_t num_pools = m->sender.page_table.pools.size();
  if (d->ok() && !m->grants.empty() && m->grants.size() != num_pools) {
    d->Invalid(grants.path, absl::StrCat("one grant per pool or none: grants=",
                                         m->grants.size(), " pools=", num_pools));
  }
  const Value staging = r.Next();
  if (staging.object == nullptr || !d->ok() || staging.object->type == msgpack::type::NIL) {
    return;
  }
  Record s(d, staging, kStagingGrantFields);
  StagingGrant grant;
  ReadPoolGrant(d, s.Next(), &grant.region);
  ReadUint64(d, s.Next(), &grant.slot_bytes);
  const Value slots = s.Next();
  uint64_t count = 0;
  ReadUint64(d, slots, &count);
  if (d->ok() && (count == 0 || count > UINT32_MAX || grant.slot_bytes == 0 ||
                  grant.slot_bytes > grant.region.length / count)) {
    d->Invalid(staging.path, absl::StrCat("staging slots do not fit the region: slots=",
                                          count, " slot_bytes=", grant.slot_bytes,
                                          " length=", grant.region.length));
  }
  grant.slots = static_cast<uint32_t>(count);
  if (d->ok()) m->staging = grant;
}

// A uint32 slot index.
void ReadSlot(Decoder* d, const Value& v, uint32_t* out) {
  uint64_t value = 0;
  ReadUint64(d, v, &value);
  if (d->ok() && value > UINT32_MAX) {
    d->Invalid(v.path, absl::StrCat("slot out of range: value=", value));
    return;
  }
  *out = static_cast<uint32_t>(value);
}

void Read(Decoder* d, Record& r, StagedChunk* m) {
  ReadUint64(d, r.Next(), &m->unique_rid);
  ReadId(d, r.Next(), "slice id", &m->slice_id);
  ReadId(d, r.Next(), "rank", &m->sender_rank);
  ReadSlot(d, r.Next(), &m->slot);
  ReadUint64(d, r.Next(), &m->seq);
  Budget fragments{d->limits().max_staged_fragments, "max_staged_fragments", "fragments"};
  ReadList(d, r.Next(), &fragments, &m->fragments, [d](const Value& x, StagedFragment* f) {
    Record fr(d, x, kStagedFragmentFields);
    ReadId(d, fr.Next(), "pool", &f->pool);
    ReadUint64(d, fr.Next(), &f->offset);
    const Value bytes = fr.Next();
    ReadUint64(d, bytes, &f->bytes);
    if (d->ok() && f->bytes == 0) d->Invalid(bytes.path, "empty fragment");
  });
}

void Read(Decoder* d, Record& r, StagingCredit* m) {
  ReadId(d, r.Next(), "rank", &m->receiver_rank);
  ReadSlot(d, r.Next(), &m->slot);
  ReadUint64(d, r.Next(), &m->seq);
}

void Read(Decoder* d, Record& r, RequestData* m) {
  const DecodeLimits& limits = d->limits();
  ReadUint64(d, r.Next(), &m->unique_rid);
  ReadId(d, r.Next(), "slice id", &m->slice_id);
  ReadId(d, r.Next(), "rank", &m->receiver_rank);
  ReadId(d, r.Next(), "length", &m->prompt_len);
  ReadId(d, r.Next(), "token position", &m->token_start);
  ReadId(d, r.Next(), "token position", &m->token_end);
  ReadBool(d, r.Next(), &m->is_last_slice);
  Budget groups = GroupBudget(*d);
  Budget block_ids{limits.max_block_ids, "max_block_ids", "block ids"};
  ReadList(d, r.Next(), &groups, &m->block_ids_per_group,
           [&](const Value& list, BlockList* ids) {
             ReadInts(d, list, &block_ids, "block id", ids);
           });
  ReadOptionalId(d, r.Next(), "token position", &m->dst_start_token);
  ReadOptionalId(d, r.Next(), "slot", &m->aux_slot);
  ReadOptionalId(d, r.Next(), "slot", &m->state_slot);
  ReadId(d, r.Next(), "rank", &m->dp_rank);
  ReadUint64(d, r.Next(), &m->grant_epoch);
}

void Read(Decoder* d, Record& r, SliceResult* m) {
  ReadUint64(d, r.Next(), &m->unique_rid);
  ReadId(d, r.Next(), "slice id", &m->slice_id);
  ReadId(d, r.Next(), "rank", &m->sender_rank);
  uint8_t outcome = 0;
  if (ReadEnumByte(d, r.Next(), "outcome",
                   {static_cast<uint8_t>(SliceOutcome::kSuccess),
                    static_cast<uint8_t>(SliceOutcome::kFailed)},
                   &outcome)) {
    m->outcome = static_cast<SliceOutcome>(outcome);
  }
  ReadBool(d, r.Next(), &m->is_last_slice);
  // A failure must carry an error code: an OK code would turn into an OK status at
  // the receiver, a lost failure.
  const Value code = r.Next();
  int64_t value = 0;
  if (ReadInt64(d, code, &value)) {
    const bool failed = m->outcome == SliceOutcome::kFailed;
    const int64_t min = failed ? 1 : 0;
    const int64_t max =
        failed ? static_cast<int64_t>(absl::StatusCode::kUnauthenticated) : 0;
    if (value < min || value > max) {
      d->Invalid(code.path,
                 absl::StrCat("status code does not fit the outcome: code=", value,
                              " outcome=", outcome, " min=", min, " max=", max));
    }
    m->code = static_cast<int32_t>(value);
  }
  ReadBytes(d, r.Next(), msgpack::type::STR, 0, kMaxReasonBytes, Text::kAny, &m->reason);
  ReadBool(d, r.Next(), &m->settled);
  ReadUint64(d, r.Next(), &m->bytes);
  ReadId(d, r.Next(), "count", &m->writes);
  ReadId(d, r.Next(), "count", &m->staged_chunks);
}

void Read(Decoder* d, Record& r, AuxTokens* m) {
  ReadUint64(d, r.Next(), &m->unique_rid);
  ReadId(d, r.Next(), "rank", &m->sender_rank);
  ReadOptionalId(d, r.Next(), "slot", &m->aux_slot);
  Budget tokens{d->limits().max_aux_tokens, "max_aux_tokens", "tokens"};
  ReadInts(d, r.Next(), &tokens, "token id", &m->tokens);
}

void Read(Decoder* d, Record& r, Cancel* m) {
  ReadUint64(d, r.Next(), &m->unique_rid);
  ReadId(d, r.Next(), "rank", &m->sender_rank);
  ReadRole(d, r.Next(), &m->from);
  ReadBytes(d, r.Next(), msgpack::type::STR, 0, kMaxReasonBytes, Text::kAny, &m->reason);
}

template <typename T>
Message ReadKind(Decoder* d, Record& r) {
  T message;
  Read(d, r, &message);
  return message;
}

// Each kind by variant index (= wire kind - 1).
struct Kind {
  const char* name;
  Fields fields;
  Message (*read)(Decoder*, Record&);
};
constexpr Kind kKinds[] = {
    {"RankInfoRequest", kRankInfoRequestFields, &ReadKind<RankInfoRequest>},
    {"RankInfoReply", kRankInfoReplyFields, &ReadKind<RankInfoReply>},
    {"RequestData", kRequestDataFields, &ReadKind<RequestData>},
    {"SliceResult", kSliceResultFields, &ReadKind<SliceResult>},
    {"AuxTokens", kAuxTokensFields, &ReadKind<AuxTokens>},
    {"Cancel", kCancelFields, &ReadKind<Cancel>},
    {"StagedChunk", kStagedChunkFields, &ReadKind<StagedChunk>},
    {"StagingCredit", kStagingCreditFields, &ReadKind<StagingCredit>},
};
static_assert(std::size(kKinds) == std::variant_size_v<Message>);

// Sum of count * elements over `terms`, saturating at SIZE_MAX.
size_t SaturatingSum(std::initializer_list<std::pair<size_t, size_t>> terms) {
  size_t total = 0;
  for (const auto& [count, elements] : terms) {
    size_t product = 0;
    if (__builtin_mul_overflow(count, elements, &product) ||
        __builtin_add_overflow(total, product, &total)) {
      return SIZE_MAX;
    }
  }
  return total;
}

// The most array elements (list entries and record fields together) a message
// within `limits` can hold: each list at its limit, each entry the largest record
// it can be. Every list can be within its own limit while the message as a whole
// is far over what any message holds; this bounds the whole.
size_t MaxElements(const DecodeLimits& l) {
  const size_t request_data = SaturatingSum(
      {{1, std::size(kRequestDataFields)}, {l.max_groups, 1}, {l.max_block_ids, 1}});
  const size_t rank_info_reply = SaturatingSum({
      {1, std::size(kRankInfoReplyFields) + std::size(kRankInfoFields) +
              std::size(kPageTableFields) + std::size(kTopologyFields)},
      {l.max_pools, 1 + std::size(kPoolFields)},       // pools
      {l.max_pools, 1 + std::size(kPoolGrantFields)},  // grants
      {1, std::size(kStagingGrantFields) + std::size(kPoolGrantFields)},
      {l.max_groups, 1 + std::size(kAttentionGroupFields) + std::size(kPoolViewFields)},
      {l.max_groups, 1 + std::size(kStateGroupFields)},
      {l.max_groups, 1},                                   // slice groups
      {l.max_layers, 1 + std::size(kLayerBuffersFields)},  // the largest layer entry
  });
  const size_t aux_tokens =
      SaturatingSum({{1, std::size(kAuxTokensFields)}, {l.max_aux_tokens, 1}});
  const size_t staged_chunk = SaturatingSum(
      {{1, std::size(kStagedChunkFields)},
       {l.max_staged_fragments, 1 + std::size(kStagedFragmentFields)}});
  return std::max({request_data, rank_info_reply, aux_tokens, staged_chunk});
}

// First pass over the raw bytes, without allocating per element: checks that the
// bytes hold one complete msgpack value no deeper than kMaxDepth, whose arrays and
// maps declare no more elements in all than there are bytes left to hold them
// (each takes at least one byte) nor than any message within the limits holds
// (MaxElements). msgpack::unpack allocates every array's elements as soon as it
// reads the array's length, so without this pass a 5-byte message declaring 4M
// elements would allocate 100 MB.
class BoundsVisitor : public msgpack::null_visitor {
 public:
  BoundsVisitor(size_t size, size_t max_elements)
      : size_(size), max_elements_(max_elements) {}

  enum class Error {
    kNone,
    kTooDeep,
    kMoreElementsThanBytes,
    kTooManyElements,
    kMalformed,
    kTruncated
  };
  Error error() const { return error_; }
  uint64_t elements() const { return elements_; }

  bool start_array(uint32_t n) { return Open(n); }
  bool end_array() { return Close(); }
  bool start_map(uint32_t n) { return Open(uint64_t{n} * 2); }
  bool end_map() { return Close(); }
  void parse_error(size_t, size_t) { error_ = Error::kMalformed; }
  void insufficient_bytes(size_t, size_t) { error_ = Error::kTruncated; }

 private:
  bool Open(uint64_t elements) {
    if (++depth_ > kMaxDepth) {
      error_ = Error::kTooDeep;
      return false;
    }
    elements_ += elements;
    if (elements_ > size_) {
      error_ = Error::kMoreElementsThanBytes;
      return false;
    }
    if (elements_ > max_elements_) {
      error_ = Error::kTooManyElements;
      return false;
    }
    return true;
  }
  bool Close() {
    --depth_;
    return true;
  }

  const size_t size_;
  const size_t max_elements_;
  size_t depth_ = 0;
  uint64_t elements_ = 0;
  Error error_ = Error::kNone;
};

// Strings and bins point into the caller's bytes instead of being copied; the
// decoder copies what it keeps before DecodeMessage returns.
bool ReferenceBuffer(msgpack::type::object_type, size_t, void*) { return true; }

// The kind's name when the bytes start like a message of a known kind (a fixarray
// whose first element is the kind), for errors found before decoding; else
// "message".
absl::string_view PeekKindName(absl::string_view bytes) {
  if (bytes.size() >= 2 && (static_cast<uint8_t>(bytes[0]) & 0xf0) == 0x90) {
    const uint8_t kind = static_cast<uint8_t>(bytes[1]);
    if (kind >= 1 && kind <= std::size(kKinds)) return kKinds[kind - 1].name;
  }
  return "message";
}

size_t MaxListEntries(const DecodeLimits& limits) {
  return std::max({limits.max_block_ids, limits.max_groups, limits.max_pools,
                   limits.max_layers, limits.max_aux_tokens});
}

// Unpacks `bytes` into `handle`, bounded as PROTOCOL.md ("Limits") says; errors name
// `kind_name`. Catches every msgpack exception.
absl::Status UnpackBounded(absl::string_view bytes, const DecodeLimits& limits,
                           absl::string_view kind_name, msgpack::object_handle* handle) {
  const auto error = [&](absl::StatusCode code, absl::string_view what) {
    return absl::Status(code, absl::StrCat(kind_name, ": ", what));
  };
  const auto invalid = [&](absl::string_view what) {
    return error(absl::StatusCode::kInvalidArgument, what);
  };
  if (bytes.size() > limits.max_message_bytes) {
    return error(absl::StatusCode::kResourceExhausted,
                 absl::StrCat("message too large: bytes=", bytes.size(),
                              " max_message_bytes=", limits.max_message_bytes));
  }
  if (bytes.empty()) return invalid("empty message");
  try {
    const size_t max_elements = MaxElements(limits);
    BoundsVisitor bounds(bytes.size(), max_elements);
    size_t offset = 0;
    const bool parsed = msgpack::parse(bytes.data(), bytes.size(), offset, bounds);
    switch (bounds.error()) {
      case BoundsVisitor::Error::kTooDeep:
        return invalid(absl::StrCat("nested too deep: max_depth=", kMaxDepth));
      case BoundsVisitor::Error::kMoreElementsThanBytes:
        return invalid(absl::StrCat("declares more elements than it has bytes: bytes=",
                                    bytes.size()));
      case BoundsVisitor::Error::kTooManyElements:
        return error(absl::StatusCode::kResourceExhausted,
                     absl::StrCat("more elements than any message within the limits: "
                                  "elements=",
                                  bounds.elements(), " max_elements=", max_elements));
      case BoundsVisitor::Error::kTruncated:
        return invalid(absl::StrCat("truncated: bytes=", bytes.size()));
      case BoundsVisitor::Error::kMalformed:
      case BoundsVisitor::Error::kNone:
        if (!parsed) return invalid(absl::StrCat("malformed msgpack: offset=", offset));
    }
    if (offset != bytes.size()) {
      return invalid(absl::StrCat("trailing bytes after the message: parsed=", offset,
                                  " bytes=", bytes.size()));
    }
    // msgpack's own bounds, a second line behind the pass above: no array longer
    // than the longest list DecodeLimits admits, strings within the format's
    // fixed bounds, no maps or extensions (the format has none).
    const msgpack::unpack_limit unpack_limit(
        /*array=*/std::max(MaxListEntries(limits), kMaxRecordFields), /*map=*/0,
        /*str=*/std::max(kMaxNameBytes, kMaxReasonBytes),
        /*bin=*/kMaxTransportAddressBytes,
        /*ext=*/0, /*depth=*/kMaxDepth);
    offset = 0;
    msgpack::unpack(*handle, bytes.data(), bytes.size(), offset, &ReferenceBuffer,
                    nullptr, unpack_limit);
  } catch (const msgpack::array_size_overflow&) {
    return error(absl::StatusCode::kResourceExhausted,
                 absl::StrCat("list over limit: max_entries=", MaxListEntries(limits)));
  } catch (const msgpack::str_size_overflow&) {
    return invalid(absl::StrCat("str longer than any field admits: max_bytes=",
                                std::max(kMaxNameBytes, kMaxReasonBytes)));
  } catch (const msgpack::bin_size_overflow&) {
    return invalid(absl::StrCat("bin longer than any field admits: max_bytes=",
                                kMaxTransportAddressBytes));
  } catch (const msgpack::size_overflow& e) {
    // A map or an extension (the format has neither), or nested too deep.
    return invalid(
        absl::StrCat("msgpack value the format does not have: error=", e.what()));
  } catch (const msgpack::unpack_error& e) {
    return invalid(absl::StrCat("malformed msgpack: error=", e.what()));
  } catch (const std::bad_alloc&) {
    return error(absl::StatusCode::kResourceExhausted,
                 absl::StrCat("out of memory decoding: bytes=", bytes.size()));
  } catch (const std::exception& e) {
    // msgpack documents no other exception; a kvx bug if one shows up.
    return error(absl::StatusCode::kInternal,
                 absl::StrCat("unexpected msgpack exception: error=", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view MessageKindName(const Message& message) {
  return kKinds[message.index()].name;
}

std::string EncodeMessage(const Message& message) {
  StringWriter writer;
  Packer packer(writer);
  std::visit([&](const auto& m) { Pack(packer, message, m); }, message);
  return std::move(writer).Take();
}

absl::StatusOr<Message> DecodeMessage(absl::string_view bytes,
                                      const DecodeLimits& limits) {
  const absl::string_view kind_name = PeekKindName(bytes);
  msgpack::object_handle handle;
  if (absl::Status s = UnpackBounded(bytes, limits, kind_name, &handle); !s.ok())
    return s;

  // The kind and version come first; the fields they imply follow.
  Decoder d(limits);
  const Value root{&handle.get(), Path{nullptr, kind_name}};
  if (!d.Expect(root, msgpack::type::ARRAY, "array")) return d.status();
  const msgpack::object_array& top = root.object->via.array;
  if (top.size < 2) {
    d.Invalid(root.path, absl::StrCat("missing kind or version: fields=", top.size));
    return d.status();
  }
  const Value kind{&top.ptr[0], Path{&root.path, "kind"}};
  uint64_t kind_value = 0;
  ReadUint64(&d, kind, &kind_value);
  if (d.ok() && (kind_value < 1 || kind_value > std::size(kKinds))) {
    d.Invalid(kind.path, absl::StrCat("unknown message kind: kind=", kind_value));
  }
  if (!d.ok()) return d.status();
  const Kind& k = kKinds[kind_value - 1];
  const Value message_root{root.object, Path{nullptr, k.name}};
  const Value version{&top.ptr[1], Path{&message_root.path, "version"}};
  uint64_t version_value = 0;
  ReadUint64(&d, version, &version_value);
  if (d.ok() && version_value != kProtocolVersion) {
    d.Invalid(version.path, absl::StrCat("unsupported version: version=", version_value,
                                         " supported=", kProtocolVersion));
  }
  Record r(&d, message_root, k.fields);
  r.Skip(2);  // kind and version, read above
  Message message = k.read(&d, r);
  if (!d.ok()) return d.status();
  return message;
}

}  // namespace kvx::transfer
