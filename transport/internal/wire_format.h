// Do not include directly. Internal to //transport and its backends.
// IWYU pragma: private
//
// Fixed-width little-endian fields for the transport's compact binary encodings
// (region descriptors, endpoint addresses). A reader never reads past its input:
// each Read* returns false instead, so decoding untrusted bytes cannot crash.

#ifndef KVX_TRANSPORT_INTERNAL_WIRE_FORMAT_H_
#define KVX_TRANSPORT_INTERNAL_WIRE_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace kvx::transport_internal {

inline void AppendLittleEndian(uint64_t value, int bytes, std::string* out) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

class WireReader {
 public:
  explicit WireReader(absl::string_view bytes) : bytes_(bytes) {}

  bool ReadLittleEndian(int bytes, uint64_t* value) {
    if (bytes_.size() < static_cast<size_t>(bytes)) return false;
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= uint64_t{static_cast<uint8_t>(bytes_[i])} << (8 * i);
    bytes_.remove_prefix(bytes);
    *value = v;
    return true;
  }

  bool ReadBytes(size_t n, absl::string_view* out) {
    if (bytes_.size() < n) return false;
    *out = bytes_.substr(0, n);
    bytes_.remove_prefix(n);
    return true;
  }

  size_t remaining() const { return bytes_.size(); }

 private:
  absl::string_view bytes_;
};

}  // namespace kvx::transport_internal

#endif  // KVX_TRANSPORT_INTERNAL_WIRE_FORMAT_H_
