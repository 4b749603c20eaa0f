// A small JSON reader: enough for the manifest (objects, arrays, strings, numbers, bools,
// null). Parse errors throw std::runtime_error with the byte offset.
#pragma once

#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace mini_json {

struct Value;
using Object = std::map<std::string, Value>;
using Array = std::vector<Value>;

struct Value {
  std::variant<std::nullptr_t, bool, double, std::string, std::shared_ptr<Array>, std::shared_ptr<Object>> v;

  bool is_object() const { return std::holds_alternative<std::shared_ptr<Object>>(v); }
  bool is_array() const { return std::holds_alternative<std::shared_ptr<Array>>(v); }
  bool is_string() const { return std::holds_alternative<std::string>(v); }
  bool is_number() const { return std::holds_alternative<double>(v); }

  const Object& object() const {
    if (!is_object()) throw std::runtime_error("expected a JSON object");
    return *std::get<std::shared_ptr<Object>>(v);
  }
  const Array& array() const {
    if (!is_array()) throw std::runtime_error("expected a JSON array");
    return *std::get<std::shared_ptr<Array>>(v);
  }
  const std::string& string() const {
    if (!is_string()) throw std::runtime_error("expected a JSON string");
    return std::get<std::string>(v);
  }
  double number() const {
    if (!is_number()) throw std::runtime_error("expected a JSON number");
    return std::get<double>(v);
  }
  const Value& at(const std::string& key) const {
    const auto& o = object();
    auto it = o.find(key);
    if (it == o.end()) throw std::runtime_error("missing field '" + key + "'");
    return it->second;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse() {
    Value v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("JSON parse error at byte " + std::to_string(i_) + ": " + what);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }

  Value value() {
    char c = peek();
    if (c == '{') return object();
    if (c == '[') return array();
    if (c == '"') return Value{string()};
    if (literal("true")) return Value{true};
    if (literal("false")) return Value{false};
    if (literal("null")) return Value{nullptr};
    return number();
  }

  Value object() {
    expect('{');
    auto o = std::make_shared<Object>();
    if (peek() == '}') {
      ++i_;
      return Value{o};
    }
    while (true) {
      if (peek() != '"') fail("expected a key");
      std::string key = string();
      expect(':');
      (*o)[key] = value();
      char c = peek();
      ++i_;
      if (c == '}') break;
      if (c != ',') fail("expected ',' or '}'");
    }
    return Value{o};
  }

  Value array() {
    expect('[');
    auto a = std::make_shared<Array>();
    if (peek() == ']') {
      ++i_;
      return Value{a};
    }
    while (true) {
      a->push_back(value());
      char c = peek();
      ++i_;
      if (c == ']') break;
      if (c != ',') fail("expected ',' or ']'");
    }
    return Value{a};
  }

  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c == '\\') {
        if (i_ >= s_.size()) fail("bad escape");
        char e = s_[i_++];
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'r': out += '\r'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'u': {  // keep ASCII; anything else becomes '?', enough for names and paths
            if (i_ + 4 > s_.size()) fail("bad \\u escape");
            long code = std::strtol(s_.substr(i_, 4).c_str(), nullptr, 16);
            out += code < 128 ? static_cast<char>(code) : '?';
            i_ += 4;
            break;
          }
          default: out += e;
        }
      } else {
        out += c;
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }

  Value number() {
    const char* start = s_.c_str() + i_;
    char* end = nullptr;
    double d = std::strtod(start, &end);
    if (end == start) fail("unexpected character");
    i_ += static_cast<size_t>(end - start);
    return Value{d};
  }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

}  // namespace mini_json
