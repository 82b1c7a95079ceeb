module so8t.test/gothink

go 1.19
