#include "transport/transport.h"

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transport/internal/wire_format.h"

namespace kvx::transport {
namespace {
constexpr absl::string_view kRegionMagic = "KVXR";
}  // namespace

std::string EncodeRegionDescriptor(const RegionDescriptor& descriptor) {
  std::string out(kRegionMagic);
  out.reserve(kEncodedRegionDescriptorBytes);
  transport_internal::AppendLittleEndian(kRegionDescriptorVersion, 1, &out);
  transport_internal::AppendLittleEndian(descriptor.address, 8, &out);
  transport_internal::AppendLittleEndian(descriptor.length, 8, &out);
  transport_internal::AppendLittleEndian(descriptor.key, 8, &out);
  return out;
}

absl::StatusOr<RegionDescriptor> DecodeRegionDescriptor(absl::string_view bytes) {
  if (bytes.size() != kEncodedRegionDescriptorBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("region descriptor has wrong size: size=", bytes.size(),
                     " expected=", kEncodedRegionDescriptorBytes));
  }
  transport_internal::WireReader reader(bytes);
  absl::string_view magic;
  uint64_t version = 0;
  RegionDescriptor d;
  // The size check above guarantees every read below succeeds.
  reader.ReadBytes(kRegionMagic.size(), &magic);
  reader.ReadLittleEndian(1, &version);
  reader.ReadLittleEndian(8, &d.address);
  reader.ReadLittleEndian(8, &d.length);
  reader.ReadLittleEndian(8, &d.key);
  if (magic != kRegionMagic) {
    return absl::InvalidArgumentError("region descriptor has wrong magic");
  }
  if (version != kRegionDescriptorVersion) {
    return absl::InvalidArgumentError(absl::StrCat(
        "region descriptor has unknown version: version=", version,
        " supported=", kRegionDescriptorVersion));
  }
  return d;
}

}  // namespace kvx::transport

namespace kvx::transport {

absl::Status AwaitTransfer(Transport& transport, TransferId id, absl::Time wait_deadline) {
  absl::StatusOr<TransferStatus> status = transport.WaitTransfer(id, wait_deadline);
  if (!status.ok()) return status.status();
  return status->error;
}

}  // namespace kvx::transport
