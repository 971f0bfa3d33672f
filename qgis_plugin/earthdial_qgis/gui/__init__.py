"""The panel, its dialogs and map tools: everything an analyst sees and clicks."""
