// For //transport, its backends and the tools' soak (//transport:sanitizers).
//
// Which sanitizer this translation unit is built with (gcc defines __SANITIZE_*__,
// clang answers __has_feature). Tests scale their sizes down under sanitizers and
// skip what an uninstrumented system library cannot survive there; the soak allows
// for AddressSanitizer's quarantine.

#ifndef KVX_TRANSPORT_INTERNAL_SANITIZERS_H_
#define KVX_TRANSPORT_INTERNAL_SANITIZERS_H_

namespace kvx::transport_internal {

#if defined(__has_feature)
#define KVX_HAS_FEATURE_(x) __has_feature(x)
#else
#define KVX_HAS_FEATURE_(x) 0
#endif

#if defined(__SANITIZE_THREAD__) || KVX_HAS_FEATURE_(thread_sanitizer)
inline constexpr bool kThreadSanitizer = true;
#else
inline constexpr bool kThreadSanitizer = false;
#endif

#if defined(__SANITIZE_ADDRESS__) || KVX_HAS_FEATURE_(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif

#undef KVX_HAS_FEATURE_

inline constexpr bool kSanitizedBuild = kThreadSanitizer || kAddressSanitizer;

}  // namespace kvx::transport_internal

#endif  // KVX_TRANSPORT_INTERNAL_SANITIZERS_H_
