module so8t.test/gotemplate

go 1.19
