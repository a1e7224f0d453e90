// The error path of maskaq._C: bad input becomes one Python exception with one message.
//
// TORCH_CHECK formats its message through std::ostringstream and prefixes the source location
// (an ostream of line numbers), so every failed check runs libstdc++'s locale facets. A process
// that holds two copies of libstdc++ (a conda or plugin runtime beside the system one) can have
// broken facets, and then the error path itself crashes. These macros build the message with
// std::to_chars and plain string appends, and throw c10's typed errors through their base
// constructor (no source location): the message is the same on every process and locale.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace maskaq {
namespace errors {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void put(std::string& s, T v) {
  char buf[24];
  auto end = std::to_chars(buf, buf + sizeof(buf), v).ptr;
  s.append(buf, end);
}

// The shortest decimal that reads back as the same double (std::to_chars never uses the locale).
inline void put(std::string& s, double v) {
  char buf[32];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  s.append(buf, res.ec == std::errc() ? res.ptr : buf);
}
inline void put(std::string& s, float v) { put(s, static_cast<double>(v)); }

inline void put(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }

inline void put(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    put(s, v[i]);
  }
  s += ']';
}
inline void put(std::string& s, const std::vector<int64_t>& v) { put(s, at::IntArrayRef(v)); }

template <typename... Args>
inline std::string message(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

template <typename E>
[[noreturn]] inline void raise(std::string msg) {
  throw E(std::move(msg));  // c10::Error's base constructor: no backtrace, no source location
}

}  // namespace errors
}  // namespace maskaq

// MASKAQ_CHECK_VALUE(cond, parts...): ValueError in Python; _TYPE: TypeError; _INDEX: IndexError;
// MASKAQ_CHECK: RuntimeError (an internal invariant, not the caller's input).
#define MASKAQ_CHECK_AS(error, cond, ...)                                                   \
  do {                                                                                      \
    if (C10_UNLIKELY(!(cond))) ::maskaq::errors::raise<error>(::maskaq::errors::message(__VA_ARGS__)); \
  } while (0)
#define MASKAQ_CHECK_VALUE(cond, ...) MASKAQ_CHECK_AS(c10::ValueError, cond, __VA_ARGS__)
#define MASKAQ_CHECK_TYPE(cond, ...) MASKAQ_CHECK_AS(c10::TypeError, cond, __VA_ARGS__)
#define MASKAQ_CHECK_INDEX(cond, ...) MASKAQ_CHECK_AS(c10::IndexError, cond, __VA_ARGS__)
#define MASKAQ_CHECK(cond, ...) MASKAQ_CHECK_AS(c10::Error, cond, __VA_ARGS__)
