#include <rdma/fabric.h>
#include <rdma/fi_errno.h>

#include <cerrno>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transport/libfabric/internal/fabric_endpoint.h"

namespace kvx::libfabric_internal {

absl::Status FabricError(absl::string_view what, int ret) {
  const int err = ret < 0 ? -ret : ret;
  const std::string message =
      absl::StrCat(what, ": ret=", ret, " (", fi_strerror(err), ")");
  // libfabric's FI_E* equal the system errno values; fi_errno.h omits some of them.
  switch (err) {
    case FI_EAGAIN:
    case FI_ECONNREFUSED:
    case FI_ECONNRESET:
    case ECONNABORTED:
    case FI_ENOTCONN:
    case EHOSTUNREACH:
    case ENETDOWN:
    case ENETUNREACH:
    case ESHUTDOWN:
    case EPIPE:
    case ETIMEDOUT:
    case FI_EIO:
    case EADDRNOTAVAIL:  // A node that is not ours.
    case EADDRINUSE:
    case ENODATA:        // fi_getinfo: nothing matches (no such provider or node).
      return absl::UnavailableError(message);
    case FI_EACCES:
    case EPERM:
    case EKEYREJECTED:
      return absl::PermissionDeniedError(message);
    case FI_ECANCELED:
      return absl::AbortedError(message);
    case FI_EINVAL:
    case EMSGSIZE:
    case FI_ETOOSMALL:
      return absl::InvalidArgumentError(message);
    case FI_ENOSYS:
    case FI_EOPNOTSUPP:
      return absl::UnimplementedError(message);
    case FI_ENOMEM:
    case ENOSPC:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace kvx::libfabric_internal
