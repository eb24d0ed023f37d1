# embed.cmake: write the bytes of IN as a C array into OUT
# (const unsigned char lightmoe_descset[]; const size_t lightmoe_descset_len).
file(READ ${IN} hex HEX)
string(LENGTH "${hex}" n)
math(EXPR len "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," body "${hex}")
string(REGEX REPLACE "(0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,)" "\\1\n" body "${body}")
file(WRITE ${OUT} "/* Generated from the descriptor set by proto/embed.cmake. */\n#include <stddef.h>\nconst unsigned char lightmoe_descset[] = {\n${body}\n};\nconst size_t lightmoe_descset_len = ${len};\n")
