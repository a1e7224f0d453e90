// Ends fp_contract_off_begin.h (clang's pragma ends with the file).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
